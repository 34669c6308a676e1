"""M coordinators over one shared expert pool: one set of expert actors, every coordinator working, and a
coordinator's crash (SIGKILL) reloading nothing while the others keep serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
from pydantic import ValidationError

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.loadtest.failover_bench import expert_actor_pids
from moeshard.deploy.config import ServeArgs

MODEL = "tiny"
PROMPTS = [f"Number {i} is" for i in range(12)]


# -- settings -------------------------------------------------------------------------
def test_a_served_pool_is_named_by_its_settings(tmp_path):
    base = dict(model_dir=str(tmp_path), model_name="m", expert_actors=2)
    name = ServeArgs(**base).engine_config().cluster.pool_name
    assert name.startswith("moeshard-m-") and name == ServeArgs(**base, coordinators=3).engine_config().cluster.pool_name
    assert ServeArgs(**base, dtype="bfloat16").engine_config().cluster.pool_name != name
    assert ServeArgs(**{**base, "expert_actors": 0}).engine_config().cluster.pool_name is None
    named = ServeArgs(**base, engine={"cluster": {"pool_name": "mine"}}).engine_config()
    assert named.cluster.pool_name == "mine"
    with pytest.raises(ValueError, match="compiled_graph transport serves one coordinator"):
        ServeArgs(**base, coordinators=2, engine={"cluster": {"transport": "compiled_graph"}}).engine_config()
    with pytest.raises(ValidationError):
        ServeArgs(**base, coordinators=0)


# -- offline: two coordinators, one pool -------------------------------------------------
@pytest.mark.slow
def test_offline_coordinators_attach_to_one_pool_and_a_mismatch_is_refused(tiny_mixtral_dir, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 5, 9, 33, 17], [1, 100, 3]]
    with LLM(tiny_mixtral_dir) as single:
        expected = [o.token_ids for o in single.generate(prompts, params)]
    cluster = {"pool_name": "offline-test-pool", "cpus_per_actor": 0.5}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as first:
        pids = sorted(expert_actor_pids())
        assert len(pids) == 2
        with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as second:
            assert sorted(expert_actor_pids()) == pids  # attached, nothing started
            assert [o.token_ids for o in second.generate(prompts, params)] == expected
        assert [o.token_ids for o in first.generate(prompts, params)] == expected  # the pool outlived the second
        with pytest.raises(Exception, match="started with other settings"):
            LLM(tiny_mixtral_dir, expert_actors=2, dtype="bfloat16", cluster=cluster)
        assert sorted(expert_actor_pids()) == pids

        # A rebalance right after a generation counts all of it: the coordinator reports its load first,
        # without waiting for its next check-in. The same generation twice is the same number of steps.
        first.rebalance()  # a window from here
        counted = []
        for _ in range(2):
            assert [o.token_ids for o in first.generate(prompts, params)] == expected
            counted.append(first.rebalance().steps)
        assert counted[0] > 0 and counted[0] == counted[1], counted


# -- serving: two coordinators, one pool -------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("tiny_pool", seed=6, with_tokenizer=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(model_dir, live_server):
    apps = {"/": {"model_dir": str(model_dir), "model_name": MODEL, "expert_actors": 2, "coordinators": 2}}
    with live_server(apps, num_cpus=6) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def expected(model_dir) -> dict[str, str]:
    with LLM(model_dir) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    return {p: o.text for p, o in zip(PROMPTS, outputs)}


def _get(url: str) -> dict | str:
    body = urllib.request.urlopen(url, timeout=30).read().decode()
    return json.loads(body) if body.startswith("{") else body


def _per_coordinator(server: str, key: str, polls: int = 60) -> dict[str, float]:
    """``key``'s value in each coordinator's /metrics (a scrape reaches one replica; poll until both are seen)."""
    seen: dict[str, float] = {}
    for _ in range(polls):
        lines = _get(f"{server}/metrics").splitlines()
        coordinator = next(line.split('"')[1] for line in lines if line.startswith("moeshard_coordinator_info{"))
        seen[coordinator] = next(float(line.split()[-1]) for line in lines if line.startswith(key + " "))
        if len(seen) == 2:
            break
    return seen


async def _complete_all(server: str, prompts: list[str], retries: int = 0) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=retries, timeout=120)
    try:
        outs = await asyncio.gather(
            *(client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts)
        )
    finally:
        await client.close()
    return [o.choices[0].text for o in outs]


def _wait_for_two_coordinators(server: str, without: set[int], timeout_s: float = 180.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    pids: set[int] = set()
    while time.monotonic() < deadline:
        try:
            health = _get(f"{server}/health")
        except Exception:  # noqa: BLE001 - routed to the dead replica: ask again
            time.sleep(0.5)
            continue
        if health["status"] == "ok" and len(health["pool"]["coordinators"]) == 2:
            pids.add(health["coordinator_pid"])
            if len(pids - without) == 2:
                return pids - without
        time.sleep(0.2)
    raise AssertionError(f"two coordinators were not back within {timeout_s}s (saw pids {sorted(pids)})")


@pytest.mark.slow
def test_two_coordinators_share_two_expert_actors_and_both_work(server, expected):
    pids = expert_actor_pids()
    assert len(pids) == 2  # one pool, not one per coordinator
    before = _per_coordinator(server, "moeshard_generation_tokens_total")
    texts = asyncio.run(_complete_all(server, PROMPTS * 2))
    assert texts == [expected[p] for p in PROMPTS * 2]
    after = _per_coordinator(server, "moeshard_generation_tokens_total")
    assert len(after) == 2 and all(after[c] > before.get(c, 0) for c in after)  # both coordinators generated
    health = _get(f"{server}/health")
    assert health["pool"]["expert_actors"] == 2 and len(health["pool"]["coordinators"]) == 2
    assert sorted(expert_actor_pids()) == sorted(pids)


@pytest.mark.slow
def test_a_killed_coordinator_comes_back_to_the_same_expert_actors(server, expected):
    pids = sorted(expert_actor_pids())
    coordinators = _wait_for_two_coordinators(server, without=set())
    victim = next(iter(coordinators))
    os.kill(victim, signal.SIGKILL)
    # The other coordinator serves meanwhile (a request routed to the dead one is retried by the client).
    assert asyncio.run(_complete_all(server, PROMPTS[:6], retries=3)) == [expected[p] for p in PROMPTS[:6]]
    assert sorted(expert_actor_pids()) == pids
    back = _wait_for_two_coordinators(server, without={victim})
    assert victim not in back
    assert sorted(expert_actor_pids()) == pids  # attached again: no expert actor started or reloaded
    assert asyncio.run(_complete_all(server, PROMPTS)) == [expected[p] for p in PROMPTS]


# -- rebalancing and scaling the shared pool while both coordinators stream (last: they change the pool) --
async def _stream_all(server: str, prompts: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def _actors_seen_by_both(server: str, count: int, polls: int = 60) -> None:
    """Both coordinators' /v1/experts list ``count`` actors (a request reaches one replica: poll)."""
    seen: dict[int, set] = {}
    for _ in range(polls):
        health, experts = _get(f"{server}/health"), _get(f"{server}/v1/experts")
        seen.setdefault(experts["expert_actors"], set()).add(health["coordinator_id"])
        if experts["expert_actors"] == count:
            assert sorted({a for row in experts["placement"] for a in row["actors"]}) == list(range(count))
        if len(seen.get(count, ())) == 2:
            return
        time.sleep(0.1)
    raise AssertionError(f"not both coordinators showed {count} expert actors: {seen}")


@pytest.mark.slow
def test_the_shared_pool_rebalances_from_both_coordinators_load(server, expected, background_rounds):
    from moeshard.cluster.client import Client

    _wait_for_two_coordinators(server, without=set())
    streams = background_rounds(lambda: asyncio.run(_stream_all(server, PROMPTS)))
    streams.wait_for_next()
    with Client(server) as client:
        before = client.experts().balance
        report = client.rebalance()  # both coordinators switch between steps, while streams run
        after = client.experts().balance
    streams.wait_for_next()
    rounds = streams.stop()
    assert report.switched and report.version == before.placement_version + 1 == after.placement_version
    assert report.steps > 0 and after.rebalances == before.rebalances + 1
    assert all(texts == [expected[p] for p in PROMPTS] for texts in rounds)
    per_coordinator = _per_coordinator(server, "moeshard_rebalances")  # one pool-wide count, read by both
    assert len(per_coordinator) == 2 and set(per_coordinator.values()) == {float(after.rebalances)}


@pytest.mark.slow
def test_the_shared_pool_scales_two_three_two_while_both_coordinators_stream(server, expected, background_rounds):
    from moeshard.cluster.client import Client

    pids = sorted(expert_actor_pids())
    _wait_for_two_coordinators(server, without=set())
    streams = background_rounds(lambda: asyncio.run(_stream_all(server, PROMPTS)))
    streams.wait_for_next()
    with Client(server) as client:
        grown = client.scale(3)  # through the SDK
    assert (grown.expert_actors_before, grown.expert_actors, grown.started, grown.switched) == (2, 3, [2], True)
    _actors_seen_by_both(server, 3)
    assert len(expert_actor_pids()) == 3
    streams.wait_for_next()
    shrink = subprocess.run(  # through the CLI
        [sys.executable, "-m", "moeshard.cluster.cli.main", "scale", "--url", server, "--expert-actors", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert shrink.returncode == 0, shrink.stderr
    assert "expert actors 3 -> 2" in shrink.stdout and "stopped [2]" in shrink.stdout
    _actors_seen_by_both(server, 2)
    streams.wait_for_next()
    rounds = streams.stop()
    assert len(rounds) >= 3 and all(texts == [expected[p] for p in PROMPTS] for texts in rounds)
    deadline = time.monotonic() + 60
    while sorted(expert_actor_pids()) != pids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(expert_actor_pids()) == pids  # the stopped actor is gone, the others were never restarted


@pytest.mark.slow
def test_a_bad_scale_request_is_a_400_and_changes_nothing(server):
    for body in ({"expert_actors": 0}, {"expert_actors": "many"}, {"actors": 3}, {}):
        request = urllib.request.Request(
            f"{server}/v1/experts/scale", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400
        assert json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"
    assert _get(f"{server}/v1/experts")["expert_actors"] == 2
