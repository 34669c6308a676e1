"""No request lost when an expert actor dies: failover to replicas, wait-and-retry through Ray's restart.

Actors are killed the hard way (SIGKILL of the actor's process) in the middle of a generation, on a
multi-node ``ray.cluster_utils`` cluster; every output must equal the fault-free single-process run.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from moeshard.actors.transport import ExpertActorFailed
from moeshard.cluster import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3, 8], [1, 7, 7, 7, 64, 12, 90, 4, 55, 21, 3]]
LONG = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)
NODES = ("node_a", "node_b")
REPLICATED_3 = {e: [e % 3, (e + 1) % 3] for e in range(8)}  # every expert on two of three actors


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
        for name in NODES:
            cluster.add_node(num_cpus=4, resources={name: 100})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, LONG)]


def _cluster_options(num_actors: int, **extra) -> dict:
    pinned = [{NODES[a % 2]: 1} for a in range(num_actors)]
    return dict(actor_resources=pinned, coordinator_resources={"head": 1}, **extra)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


CASES = {
    "sole_host_socket": dict(actors=2, victims=[1], transport="socket"),
    "sole_host_actor_calls": dict(actors=2, victims=[1], transport="actor_calls"),
    "sole_host_compiled_graph": dict(actors=2, victims=[1], transport="compiled_graph"),
    "replicas_socket": dict(actors=3, victims=[1], transport="socket", expert_map=REPLICATED_3),
    "replicas_actor_calls": dict(actors=3, victims=[1], transport="actor_calls", expert_map=REPLICATED_3),
    "replicas_compiled_graph": dict(actors=3, victims=[2], transport="compiled_graph", expert_map=REPLICATED_3),
    "sole_host_collective": dict(actors=2, victims=[1], transport="collective"),
    "replicas_collective": dict(actors=3, victims=[1], transport="collective", expert_map=REPLICATED_3),
    "two_at_once_covered_by_replicas": dict(
        actors=4, victims=[0, 1], transport="actor_calls", expert_map={e: [e % 4, (e + 2) % 4] for e in range(8)}
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkilled_expert_actor_loses_no_request(case, ray_cluster, tiny_mixtral_dir, reference, expert_actor_pid, mid_generation):
    spec = dict(CASES[case])
    num_actors, victims = spec.pop("actors"), spec.pop("victims")
    options = _cluster_options(num_actors, dispatch_timeout_s=20, **spec)
    with LLM(tiny_mixtral_dir, expert_actors=num_actors, cluster=options) as llm:
        pids = [expert_actor_pid(llm, v) for v in victims]

        def kill_victims():
            for pid in pids:
                _kill(pid)

        tokens = mid_generation.generate_while(llm, PROMPTS, LONG, lambda: mid_generation.once_decoding(llm, kill_victims))
        assert tokens == reference
        # At least one kill was seen failing. Not necessarily every one: an actor killed while none of its
        # calls was in flight, that Ray restarts before the dispatch next picks it, answers that call from the
        # new process (once with two victims whose experts have replicas: failures (1, 0, 0, 0)).
        assert sum(llm.expert_health().failures) >= 1
        assert [expert_actor_pid(llm, v) for v in victims] != pids  # Ray restarted them; they serve again
        assert [o.token_ids for o in llm.generate(PROMPTS, LONG)] == reference


@pytest.mark.slow
def test_same_actor_killed_twice_in_a_row(ray_cluster, tiny_mixtral_dir, reference, expert_actor_pid, mid_generation):
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=_cluster_options(2, dispatch_timeout_s=20)) as llm:
        killed: list[int] = []

        def kill_actor_0():
            pid = expert_actor_pid(llm, 0)  # answered once Ray has restarted it and it has reloaded its experts
            _kill(pid)
            killed.append(pid)

        def twice():
            mid_generation.once_decoding(llm, kill_actor_0)
            mid_generation.once_decoding(llm, kill_actor_0, steps=2)  # once the generation goes on after the first restart

        assert mid_generation.generate_while(llm, PROMPTS, LONG, twice) == reference
        assert killed[0] != killed[1] and expert_actor_pid(llm, 0) not in killed  # two real deaths, two restarts
        assert llm.expert_health().failures[0] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["socket", "collective"])
def test_actor_that_stops_answering_is_routed_around(transport, ray_cluster, tiny_mixtral_dir, reference, mid_generation):
    """A stuck actor past the dispatch timeout takes the failover path; its late reply is never used."""
    options = _cluster_options(3, dispatch_timeout_s=2, expert_map=REPLICATED_3, transport=transport)
    with LLM(tiny_mixtral_dir, expert_actors=3, cluster=options) as llm:
        stuck = llm._cluster.expert_actors[1]

        def delay_one_call():
            ray.get(stuck.delay_next_calls.remote(6.0, 1))

        tokens = mid_generation.generate_while(llm, PROMPTS, LONG, lambda: mid_generation.once_decoding(llm, delay_one_call))
        assert tokens == reference
        assert llm.expert_health().failures[1] >= 1


@pytest.mark.slow
def test_request_fails_only_when_recovery_fails(ray_cluster, tiny_mixtral_dir):
    """A sole host that never comes back: the request fails after recovery_timeout_s, naming the actor and experts."""
    options = _cluster_options(2, dispatch_timeout_s=5, recovery_timeout_s=3)
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=options) as llm:
        started = time.monotonic()
        ray.kill(llm._cluster.expert_actors[1], no_restart=True)
        with pytest.raises(ExpertActorFailed, match=r"expert actor 1 .*experts \[4, 5, 6, 7\]"):
            llm.generate(PROMPTS, LONG)
        assert time.monotonic() - started < 60


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["socket", "collective", "actor_calls"])
def test_sigkill_under_ping_pong_loses_no_request(
    transport, ray_cluster, tiny_mixtral_dir, reference, expert_actor_pid, mid_generation
):  # fmt: skip
    """Two micro-batches in flight per step (ping-pong): the kill fails one pass while the other's dispatch is out;
    the step is retried whole and every output equals the single process's."""
    options = _cluster_options(2, dispatch_timeout_s=20, transport=transport)
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=options, ping_pong_min_sequences=2) as llm:
        pid = expert_actor_pid(llm, 1)
        tokens = mid_generation.generate_while(llm, PROMPTS, LONG, lambda: mid_generation.once_decoding(llm, lambda: _kill(pid)))
        assert tokens == reference
        assert llm.expert_health().failures[1] >= 1
        assert expert_actor_pid(llm, 1) != pid
        assert [o.token_ids for o in llm.generate(PROMPTS, LONG)] == reference


@pytest.mark.slow
def test_sigkill_with_decode_mirrors_loses_no_request(ray_cluster, tiny_mixtral_dir, reference, expert_actor_pid, mid_generation):
    """The coordinator reads every decode group from its decode mirrors (kernels/decode_mirror.py; two under
    ping-pong, kept from step to step): a kill fails a pass part way through its layers, the step is retried whole,
    the mirrors refill, and every output equals the single process's (which gathers)."""
    options = _cluster_options(2, dispatch_timeout_s=20, transport="socket")
    mirrored = dict(ping_pong_min_sequences=2, decode_mirror_min_keys=0)  # every group mirrored, small as they are
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=options, **mirrored) as llm:
        pid = expert_actor_pid(llm, 0)
        tokens = mid_generation.generate_while(llm, PROMPTS, LONG, lambda: mid_generation.once_decoding(llm, lambda: _kill(pid)))
        assert tokens == reference
        assert llm.expert_health().failures[0] >= 1 and expert_actor_pid(llm, 0) != pid
        assert [o.token_ids for o in llm.generate(PROMPTS, LONG)] == reference


@pytest.mark.slow
def test_request_fails_cleanly_under_ping_pong_when_recovery_fails(ray_cluster, tiny_mixtral_dir):
    """A sole host gone for good while both micro-batches are dispatched: the request fails naming it, no hang, and
    the coordinator still answers (the other micro-batch's dispatch was abandoned, not left waiting)."""
    options = _cluster_options(2, dispatch_timeout_s=5, recovery_timeout_s=3, transport="socket")
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=options, ping_pong_min_sequences=2) as llm:
        llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0))  # links open, both micro-batches run
        started = time.monotonic()
        ray.kill(llm._cluster.expert_actors[1], no_restart=True)
        with pytest.raises(ExpertActorFailed, match=r"expert actor 1 .*experts \[4, 5, 6, 7\]"):
            llm.generate(PROMPTS, LONG)
        assert time.monotonic() - started < 60
        assert llm.expert_health().failures[1] >= 1
