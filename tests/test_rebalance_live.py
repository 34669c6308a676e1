"""Live rebalancing on Ray: a skewed router's hot experts get replicas while a generation runs, and the tokens
equal the single-process run's, before, during and after; combined with SIGKILLed expert actors, no request is lost."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from moeshard.actors.ray_init import init_ray
from moeshard.cluster import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3, 8], [1, 7, 7, 7, 64, 12, 90, 4, 55, 21, 3], [1, 2, 3]]
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
CLUSTER = {"redundant_experts": 4, "dispatch_timeout_s": 20}


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
        init_ray(num_cpus=8, include_dashboard=False, logging_level="WARNING")
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(skewed_mixtral_dir):
    with LLM(skewed_mixtral_dir) as llm:
        return {
            "long": [o.token_ids for o in llm.generate(PROMPTS, LONG)],
            "short": [o.token_ids for o in llm.generate(PROMPTS, SHORT)],
            "logits": [llm.logits(p) for p in PROMPTS],
        }


def _start_generation(llm: LLM) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["tokens"] = [o.token_ids for o in llm.generate(PROMPTS, LONG)]
        except Exception as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcome


def _wait_for_steps(llm: LLM, steps: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while llm.expert_balance()["window"]["steps"] < steps:
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.05)


def _assert_same_logits(llm: LLM, reference: dict) -> None:
    for prompt, expected in zip(PROMPTS, reference["logits"]):
        assert (llm.logits(prompt) - expected).abs().max().item() < 1e-5


@pytest.mark.slow
def test_rebalance_during_a_generation_keeps_every_token(ray_local, skewed_mixtral_dir, reference):
    with LLM(skewed_mixtral_dir, expert_actors=4, cluster=CLUSTER) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, SHORT)] == reference["short"]
        before = llm.expert_balance()
        assert before["slots_per_actor"] == [3, 3, 3, 3] and before["placement_version"] == 0
        assert before["window"]["imbalance"][0] > 1.3  # the hot experts' actors take most rows

        worker, outcome = _start_generation(llm)
        _wait_for_steps(llm, before["window"]["steps"] + 20)
        report = llm.rebalance()
        assert worker.is_alive(), "the generation finished before the switch: it did not run across it"
        worker.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["tokens"] == reference["long"]

        assert report.switched and report.version == 1 and report.failed_actors == []
        assert report.moved > 0 and report.bytes_loaded > 0
        assert report.imbalance_after[0] < report.imbalance_before[0]
        assert report.imbalance_after[0] < 1.1
        hosts = report.placement.hosts[0]
        assert len(hosts[5]) > 1 and len(hosts[6]) > 1  # the hot experts were replicated
        rows = {row["expert"]: row["actors"] for row in llm.placement() if row["layer"] == 0}
        assert rows[5] == list(hosts[5])
        for actor, handle in enumerate(llm._cluster.expert_actors):
            info = ray.get(handle.info.remote())
            assert info["versions"] == [1]  # the old version was retired
            assert info["hosted"][0] == [e for e, h in enumerate(hosts) if actor in h]

        _assert_same_logits(llm, reference)
        assert [o.token_ids for o in llm.generate(PROMPTS, LONG)] == reference["long"]
        after = llm.expert_balance()
        assert after["window"]["imbalance"][0] < report.measured_imbalance[0]  # measured on the rows sent
        assert after["last_rebalance"]["version"] == 1 and after["rebalances"] == 1


@pytest.mark.slow
def test_rebalance_with_killed_actors_loses_no_request(ray_local, skewed_mixtral_dir, reference, expert_actor_pid):
    with LLM(skewed_mixtral_dir, expert_actors=4, cluster=CLUSTER) as llm:
        llm.generate(PROMPTS[:1], SHORT)
        victim = expert_actor_pid(llm, 1)
        worker, outcome = _start_generation(llm)
        _wait_for_steps(llm, 20)
        os.kill(victim, signal.SIGKILL)  # dies during the generation, and while the rebalance stages
        report = llm.rebalance()
        worker.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["tokens"] == reference["long"]
        assert report.switched and report.version == 1
        assert llm.expert_health().failures[1] >= 1

        # Killed after the switch: Ray restarts it with the placement it started with; its first batch of
        # version 1 is answered stale, and the dispatch's probe loads version 1 before it takes work again.
        second = expert_actor_pid(llm, 2)
        os.kill(second, signal.SIGKILL)
        assert expert_actor_pid(llm, 2) != second  # restarted
        assert [o.token_ids for o in llm.generate(PROMPTS, LONG)] == reference["long"]
        assert llm.expert_health().failures[2] >= 1  # its stale answer took it out until it had adopted version 1
        _assert_same_logits(llm, reference)
        for handle in llm._cluster.expert_actors:
            assert ray.get(handle.info.remote())["versions"] == [1]


@pytest.mark.slow
def test_rebalance_over_a_compiled_graph(ray_local, skewed_mixtral_dir, reference):
    """The actors stage in their control group while the graph's loop holds its own thread; the graph runs on."""
    options = dict(CLUSTER, transport="compiled_graph", redundant_experts=2)
    with LLM(skewed_mixtral_dir, expert_actors=2, cluster=options) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, SHORT)] == reference["short"]
        report = llm.rebalance()
        assert report.switched and report.failed_actors == []
        assert max(report.imbalance_after) < max(report.imbalance_before)
        assert [o.token_ids for o in llm.generate(PROMPTS, SHORT)] == reference["short"]  # short: idle graph actors poll
        _assert_same_logits(llm, reference)


@pytest.mark.slow
def test_a_shared_pool_rebalances_itself_from_its_coordinators_reported_load(ray_local, skewed_mixtral_dir, reference):
    """The manager's automatic rebalancing: the coordinator reports its load with each check-in, the manager's
    window fills, the skew triggers a rebalance, and the coordinator switches mid-generation."""
    cluster = {**CLUSTER, "pool_name": "auto-rebalance-pool", "cpus_per_actor": 0.5}
    cluster.update(auto_rebalance_s=1.0, auto_rebalance_min_steps=20)
    with LLM(skewed_mixtral_dir, expert_actors=4, cluster=cluster) as llm:
        worker, outcome = _start_generation(llm)
        deadline = time.monotonic() + 120
        while (balance := llm.expert_balance())["rebalances"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        worker.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["tokens"] == reference["long"]
        assert balance["rebalances"] >= 1 and balance["placement_version"] >= 1
        last = balance["last_rebalance"]
        assert last["switched"] and last["steps"] >= 20 and max(last["imbalance_after"]) < max(last["imbalance_before"])
