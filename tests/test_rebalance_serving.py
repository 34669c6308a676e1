"""POST /v1/experts/rebalance through the server: behind the API key, while streams run, outputs unchanged."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from moeshard.cluster import LLM, SamplingParams

MODEL = "tiny"
API_KEY = "rebalance-key"
PROMPTS = ["Hello, my name is", "The weather today", "One two three four five six seven", "Paris is"]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server(skewed_chat_mixtral_dir, live_server):
    cluster = {"redundant_experts": 1, "dispatch_timeout_s": 20}  # slots 5 + 4; the spare one starts with expert 0
    app = {
        "model_dir": str(skewed_chat_mixtral_dir), "model_name": MODEL, "api_key": API_KEY, "expert_actors": 2,
        "engine": {"cluster": cluster},
    }  # fmt: skip
    with live_server({"/": app}, num_cpus=6) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def expected(skewed_chat_mixtral_dir) -> list[str]:
    with LLM(skewed_chat_mixtral_dir) as llm:
        return [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))]


def _call(url: str, method: str = "GET", key: str | None = API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def _completions_while_rebalancing(server: str, stream_while) -> tuple[list[str], dict]:
    async def rebalance() -> tuple[int, dict]:
        return await asyncio.to_thread(_call, f"{server}/v1/experts/rebalance", "POST")

    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    try:  # once a stream is half done: the window holds decode load and half the work is still to run
        texts, (status, report) = await stream_while(client, MODEL, PROMPTS, MAX_TOKENS, MAX_TOKENS // 2, rebalance)
    finally:
        await client.close()
    assert status == 200, report
    return texts, report


@pytest.mark.slow
def test_rebalance_route_is_behind_the_key_and_keeps_outputs(server, expected, stream_while):
    assert _call(f"{server}/v1/experts/rebalance", "POST", key=None)[0] == 401
    assert _call(f"{server}/v1/experts/rebalance", "POST", key="wrong")[0] == 401

    texts, report = asyncio.run(_completions_while_rebalancing(server, stream_while))
    assert texts == expected
    assert report["switched"] and report["version"] == 1
    assert max(report["imbalance_before"]) > 1.2 and max(report["imbalance_after"]) < 1.1

    status, experts = _call(f"{server}/v1/experts")
    assert status == 200
    assert experts["balance"]["placement_version"] == 1 and experts["balance"]["rebalances"] == 1
    assert experts["balance"]["last_rebalance"]["bytes_loaded"] == report["bytes_loaded"]
    for layer in (0, 1):
        rows = [row for row in experts["placement"] if row["layer"] == layer]
        assert sum(len(row["actors"]) for row in rows) == 9  # every slot holds an expert
        assert all(sum(row["shares"]) == pytest.approx(1.0) for row in rows)

    from moeshard.cluster.client import Client

    with Client(server, api_key=API_KEY, max_retries=0, timeout=120) as sdk:  # the SDK reads the same balance
        balance = sdk.experts().balance
        assert balance.placement_version == 1 and balance.last_rebalance.bytes_loaded == report["bytes_loaded"]
        # Load since the first rebalance: on a fast machine the streams can all end before it switches.
        with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
            client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0)
        again = sdk.rebalance()  # from the load since the first: the balanced layout leaves little to gain
        assert again.steps > 0 and again.version >= 1 and max(again.imbalance_before) < 1.3

    with urllib.request.urlopen(urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})) as r:
        metrics = r.read().decode()
    assert 'moeshard_rebalance_imbalance{layer="0",when="after"}' in metrics
    assert "moeshard_expert_actor_rows_per_step" in metrics
