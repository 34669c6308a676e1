"""Through the server: SIGKILL of an expert actor while 8 streams run fails none of them (over the socket
and the collective transport).

The streams' texts equal the offline single-process run; /health reports the actor recovering (degraded)
and then ok; /metrics counts the failure, the resent dispatches and the recovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.loadtest.failover_bench import expert_actor_pids

MODEL = "tiny"
PROMPTS = ["Hello, my name is", "The weather today", "One two three four five six seven", "Paris is"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def chat_model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("tiny_failover", seed=5, with_tokenizer=True, max_position_embeddings=512)


@pytest.fixture(scope="module", params=["socket", "collective"])
def server(request, chat_model_dir, live_server):
    cluster = {"dispatch_timeout_s": 20, "transport": request.param}
    app = {"model_dir": str(chat_model_dir), "model_name": MODEL, "expert_actors": 2, "engine": {"cluster": cluster}}
    with live_server({"/": app}, num_cpus=6) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def expected(chat_model_dir) -> list[str]:
    with LLM(chat_model_dir) as llm:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        return [llm.generate(PROMPTS[i % 4], params)[0].text for i in range(8)]


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read().decode(), error.code
    return status, json.loads(body) if body.startswith("{") else body


async def _streams_while_killing(server: str, victim: int, stream_while) -> list[str]:
    async def kill() -> None:
        os.kill(victim, signal.SIGKILL)

    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
    try:  # the kill lands once a stream has its first tokens: in the middle of the work
        return (await stream_while(client, MODEL, [PROMPTS[i % 4] for i in range(8)], MAX_TOKENS, 4, kill)).texts
    finally:
        await client.close()


@pytest.mark.slow
def test_sigkill_of_an_expert_actor_fails_no_stream(server, expected, stream_while):
    pids = expert_actor_pids()
    assert len(pids) == 2

    texts = asyncio.run(_streams_while_killing(server, pids[1], stream_while))
    assert texts == expected

    deadline = time.monotonic() + 120
    while True:  # the restarted actor reloads its experts and takes work again
        status, health = _get(f"{server}/health")
        if status == 200 and health["status"] == "ok":
            break
        assert status == 200 and health["status"] == "degraded", health  # serving, not failing, meanwhile
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert sum(a["failures"] for a in health["expert_actors"]) >= 1
    assert len(expert_actor_pids()) == 2 and expert_actor_pids() != pids

    _, metrics = _get(f"{server}/metrics")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line and line[0] != "#"}
    assert sum(v for k, v in values.items() if k.startswith("moeshard_expert_actor_failures_total")) >= 1
    assert values["moeshard_dispatch_retries_total"] >= 1
    assert values["moeshard_expert_recovery_seconds_count"] >= 1
