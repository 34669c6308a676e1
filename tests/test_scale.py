"""Scaling the expert pool while it serves: the plan, and 2 -> 3 -> 2 actors under running generations, with
every output equal to the single process (a pool of its own, a shared pool, and a multi-node cluster)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moeshard.actors.placement import ExpertPlacement, PlacementError
from moeshard.actors.rebalance.plan import initial_placement
from moeshard.actors.rebalance.scale import plan_scale
from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.loadtest.failover_bench import expert_actor_pids

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 40, 2, 90], [1, 120], [1, 42, 43, 44]]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


# -- the plan -----------------------------------------------------------------------------
def _experts_per_actor(placement: ExpertPlacement, layer: int) -> list[int]:
    return [len(placement.hosted_by(a).get(layer, [])) for a in range(placement.num_actors)]


def _check_serves(placement: ExpertPlacement, num_experts: int) -> None:
    for layer, experts in enumerate(placement.hosts):
        if experts:
            assert len(experts) == num_experts and all(experts), f"layer {layer} leaves an expert without a host"


def test_growing_moves_only_what_the_new_actor_takes_and_shrinking_undoes_it():
    start = ExpertPlacement.even(num_layers=3, num_experts=8, num_actors=2, dense_layers=(1,))
    grown = plan_scale(start, 3)
    assert grown.version == start.version + 1 and grown.num_actors == 3
    _check_serves(grown, 8)
    assert grown.hosts[1] == ()  # a dense layer stays without experts
    for layer in (0, 2):
        assert sorted(_experts_per_actor(grown, layer)) == [2, 3, 3]
        moved = [e for e in range(8) if grown.hosts[layer][e] != start.hosts[layer][e]]
        assert len(moved) == 2 and all(grown.hosts[layer][e] == (2,) for e in moved)  # only to the new actor
    shrunk = plan_scale(grown, 2)
    assert shrunk.version == start.version + 2
    _check_serves(shrunk, 8)
    for layer in (0, 2):
        assert _experts_per_actor(shrunk, layer) == [4, 4]
        assert all(shrunk.hosts[layer][e] == grown.hosts[layer][e] for e in range(8) if 2 not in grown.hosts[layer][e])


def test_replicas_keep_their_shares_and_are_dropped_when_actors_run_out():
    start = initial_placement(num_layers=2, num_experts=4, num_actors=3, redundant=2)
    replicated = [e for e, hosts in enumerate(start.hosts[0]) if len(hosts) > 1]
    assert replicated
    grown = plan_scale(start, 5)
    _check_serves(grown, 4)
    assert [len(h) for h in grown.hosts[0]] == [len(h) for h in start.hosts[0]]  # replica counts kept
    one = plan_scale(grown, 1)
    _check_serves(one, 4)
    assert all(hosts == (0,) for hosts in one.hosts[0])
    assert one.shares is None or all(split == (1.0,) for split in one.shares[0])
    for split in (plan_scale(start, 2).shares or ((),))[0]:
        assert abs(sum(split) - 1.0) < 1e-9 if split else True
    with pytest.raises(PlacementError):
        plan_scale(start, 0)


# -- live: 2 -> 3 -> 2 under running generations ------------------------------------------------
@pytest.fixture(scope="module")
def expected(tiny_mixtral_dir) -> list[list[int]]:
    with LLM(tiny_mixtral_dir) as single:
        return [o.token_ids for o in single.generate(PROMPTS, PARAMS)]


def _wait_for_pids(count: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(pids := expert_actor_pids()) != count and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def _scale_up_and_down(llm: LLM, expected: list[list[int]], background_rounds, count_pids: bool = True) -> None:
    generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
    generations.wait_for(1)
    done = len(generations.results)
    grown = llm.scale(3)
    assert grown.expert_actors_before == 2 and grown.expert_actors == 3 and grown.started == [2]
    assert grown.switched and grown.moved > 0
    assert sorted({a for row in llm.placement() for a in row["actors"]}) == [0, 1, 2]
    if count_pids:
        assert len(_wait_for_pids(3)) == 3
    generations.wait_for(len(generations.results) + 1)
    shrunk = llm.scale(2)
    assert shrunk.expert_actors == 2 and shrunk.stopped == [2] and shrunk.switched
    assert sorted({a for row in llm.placement() for a in row["actors"]}) == [0, 1]
    if count_pids:
        assert len(_wait_for_pids(2)) == 2
    generations.wait_for(len(generations.results) + 1)
    outputs = generations.stop()
    assert len(outputs) > done + 1  # generations ran while the pool changed
    assert all(out == expected for out in outputs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "transport, ping_pong",
    [("actor_calls", 0), ("compiled_graph", 0), ("actor_calls", 2), ("collective", 2)],
    ids=["calls", "graph", "ping-pong", "collective-ping-pong"],
)
def test_own_pool_scales_two_three_two_while_generating(
    transport, ping_pong, tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, background_rounds
):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = {"cpus_per_actor": 0.5, "transport": transport}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster, ping_pong_min_sequences=ping_pong) as llm:
        pids = sorted(_wait_for_pids(2))
        _scale_up_and_down(llm, expected, background_rounds)
        assert sorted(expert_actor_pids()) == pids  # the actors that stayed were never restarted
        assert llm.scale(2).switched is False  # already 2: nothing to do


@pytest.mark.slow
def test_own_pool_scaling_and_rebalancing_asked_at_once_take_turns(
    tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, background_rounds
):
    from moeshard.actors.rebalance.live import RebalanceBusy
    from moeshard.actors.rebalance.scale import ScaleBusy

    # The driver scales a pool of its own, the coordinator actor rebalances it: the two share the coordinator's
    # lock, so one waits for the other or answers busy, never two placements under one version.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster={"cpus_per_actor": 0.5}) as llm:
        generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
        generations.wait_for(1)
        for expert_actors in (3, 2):
            with ThreadPoolExecutor(2) as both:
                asked = [both.submit(llm.scale, expert_actors), both.submit(llm.rebalance)]
                outcomes = [future.exception() or future.result() for future in asked]
            for outcome in outcomes:
                assert not isinstance(outcome, Exception) or isinstance(outcome, (ScaleBusy, RebalanceBusy)), outcome
            if isinstance(outcomes[0], Exception):
                llm.scale(expert_actors)
            assert sorted({a for row in llm.placement() for a in row["actors"]}) == list(range(expert_actors))
            generations.wait_for(len(generations.results) + 1)  # load measured over the scaled pool
            rebalanced = llm.rebalance()
            assert rebalanced.switched and rebalanced.version == llm.expert_balance()["placement_version"]
        assert all(out == expected for out in generations.stop())


@pytest.mark.slow
def test_shared_pool_scales_two_three_two_while_generating(
    tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, background_rounds
):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = {"pool_name": "scale-test-pool", "cpus_per_actor": 0.5}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as llm:
        _scale_up_and_down(llm, expected, background_rounds)
        # The pool's manager rebalances it too, from the load its coordinator reports as it checks in.
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == expected
        report = llm.rebalance()  # the coordinator reports the load it counted first
        assert report.switched and report.steps > 0 and report.version == llm.expert_balance()["placement_version"]
        assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == expected


# -- multi-node ------------------------------------------------------------------------------------
@pytest.fixture
def growing_cluster(tmp_path_factory, monkeypatch):
    """A Ray cluster of a head and two worker nodes (ray.cluster_utils) that the test can add nodes to."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_a_multi_node_pool_grows_onto_an_added_node_and_shrinks_off_it(
    growing_cluster, tiny_mixtral_dir, expected, background_rounds
):
    from moeshard.actors.rebalance.scale import ScaleBusy, ScaleError

    # Each actor takes 3 of a worker node's 4 CPUs: one actor per worker node, none on the head.
    cluster = {"pool_name": "scale-multinode", "cpus_per_actor": 3, "startup_timeout_s": 30}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as llm:
        generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
        generations.wait_for(1)
        with ThreadPoolExecutor(1) as background:
            waiting = background.submit(llm.scale, 3)  # no node has room: it waits startup_timeout_s for one
            time.sleep(3)
            with pytest.raises(ScaleBusy):
                llm.scale(3)  # one scaling at a time
            rebalanced = llm.rebalance()  # goes ahead meanwhile: a scaling waiting for room holds no lock
            assert rebalanced.switched
            assert not waiting.done()
            with pytest.raises(ScaleError, match="could not start 1 expert actors"):
                waiting.result()  # the pool serves on as it was
        assert sorted({a for row in llm.placement() for a in row["actors"]}) == [0, 1]
        node = growing_cluster.add_node(num_cpus=4)
        growing_cluster.wait_for_nodes()
        grown = llm.scale(3)
        assert grown.switched and grown.started == [2]
        nodes = {a: n for row in llm.placement() for a, n in zip(row["actors"], row["nodes"])}
        assert nodes[2] == node.node_id and len(set(nodes.values())) == 3
        generations.wait_for(len(generations.results) + 1)
        shrunk = llm.scale(2)
        assert shrunk.stopped == [2] and shrunk.switched
        nodes = {a: n for row in llm.placement() for a, n in zip(row["actors"], row["nodes"])}
        assert node.node_id not in nodes.values()
        generations.wait_for(len(generations.results) + 1)
        assert all(out == expected for out in generations.stop())


@pytest.mark.slow
def test_an_expert_actor_runs_several_coordinators_calls_at_once(tiny_mixtral_dir, tmp_path_factory, monkeypatch):
    import ray

    from moeshard.actors.wire import NO_WORK

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    for concurrency, overlapped in ((2, True), (1, False)):
        with LLM(tiny_mixtral_dir, expert_actors=1, cluster={"cpus_per_actor": 0.5, "actor_concurrency": concurrency}) as llm:
            actor = llm._cluster.expert_actors[0]
            ray.get(actor.delay_next_calls.remote(1.0, 2))
            started = time.monotonic()
            assert ray.get([actor.run_experts.remote(NO_WORK) for _ in range(2)]) == [NO_WORK, NO_WORK]
            took = time.monotonic() - started
            assert (took < 1.8) == overlapped, f"two 1 s calls took {took:.2f}s with actor_concurrency={concurrency}"


@pytest.mark.slow
def test_an_added_actor_killed_after_the_switch_comes_back_with_its_new_experts(
    tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, expert_actor_pid, background_rounds
):
    import os
    import signal

    import ray

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster={"cpus_per_actor": 0.5}) as llm:
        assert llm.scale(3).switched
        generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
        generations.wait_for(1)
        victim = expert_actor_pid(llm, 2)
        os.kill(victim, signal.SIGKILL)  # Ray restarts it from its constructor: the placement it was added with
        generations.wait_for(len(generations.results) + 2)
        assert expert_actor_pid(llm, 2) != victim
        info = ray.get(llm._cluster.expert_actors[2].info.remote())
        assert info["versions"] == [1] and info["hosted"]  # the added version, not the pool's first
        assert all(out == expected for out in generations.stop())
        assert llm.expert_health().failures[2] >= 1


# -- the pool's manager: SIGKILLed, restarted by Ray, it takes its pool back -----------------------------
def test_the_placement_is_read_back_from_what_the_actors_hold():
    from moeshard.actors.pool.recovery import placement_from_layouts

    settled = [{3: {0: [0, 1]}}, {3: {0: [2, 3]}}]  # [actor] {version: {layer: experts}}; layer 1 is dense
    placement, consistent = placement_from_layouts(settled, num_layers=2, num_experts=4, dense_layers=(1,))
    assert consistent and placement.version == 3 and placement.hosts == (((0,), (0,), (1,), (1,)), ())
    # Cut short while moving expert 1 from actor 0 to actor 1: actor 0 staged version 4 without it, actor 1 did not.
    cut_short = [{3: {0: [0, 1]}, 4: {0: [0]}}, {3: {0: [2, 3]}}]
    placement, consistent = placement_from_layouts(cut_short, num_layers=2, num_experts=4, dense_layers=(1,))
    assert not consistent and placement.version == 5  # past every version held: staged and published anew
    assert all(placement.hosts[0]) and placement.hosts[0][0] == (0,) and placement.hosts[0][2] == (1,)


def test_each_replicated_expert_gets_back_the_split_its_hosts_hold():
    from moeshard.actors.pool.recovery import with_held_shares

    hosts = (((0, 1), (0,), (1, 0), (1,)),)  # one layer: experts 0 and 2 on both actors
    shares = (((0.75, 0.25), (1.0,), (0.4, 0.6), (1.0,)),)
    placement = ExpertPlacement(num_actors=2, hosts=hosts, shares=shares, version=7)
    held = [placement.shares_held_by(a) for a in range(2)]
    assert held == [{0: {0: 0.75, 2: 0.6}}, {0: {0: 0.25, 2: 0.4}}]  # only replicated experts
    bare = ExpertPlacement(num_actors=2, hosts=hosts, version=7)
    assert with_held_shares(bare, held) == placement
    assert with_held_shares(bare, [{}, {}]) == bare  # nothing held: equal split, as before
    one_missing = with_held_shares(bare, [held[0], {0: {0: 0.25}}])  # actor 1 holds no share of expert 2
    assert one_missing.shares_of(0)[0] == (0.75, 0.25) and one_missing.shares_of(0)[2] == (0.5, 0.5)


def _manager_pid() -> int | None:
    """The pool manager's process (None while Ray restarts it)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::ExpertPoolService"):
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_a_killed_pool_manager_comes_back_with_the_same_actors_and_still_scales(
    tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, background_rounds
):
    import os
    import signal

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = {"pool_name": "manager-kill-pool", "cpus_per_actor": 0.5, "redundant_experts": 2}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as llm:
        actors = sorted(_wait_for_pids(2))
        generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
        generations.wait_for(1)
        assert llm.rebalance().switched  # replicas of the hottest experts, each split by load
        balanced = [(row["actors"], row["shares"]) for row in llm.placement()]
        assert any(len(hosts) > 1 for hosts, _ in balanced)
        victim = _manager_pid()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # generations go on: the coordinator dispatches to the actors directly
        generations.wait_for(len(generations.results) + 2)
        deadline = time.monotonic() + 120
        while (pid := _manager_pid()) in (victim, None) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid not in (victim, None) and sorted(expert_actor_pids()) == actors  # restarted; no actor reloaded
        assert [(row["actors"], row["shares"]) for row in llm.placement()] == balanced  # each replica's split too
        grown = llm.scale(3)  # the restarted manager knows its pool
        assert grown.expert_actors_before == 2 and grown.switched
        generations.wait_for(len(generations.results) + 1)
        assert all(out == expected for out in generations.stop())


@pytest.mark.slow
def test_a_manager_killed_in_the_middle_of_a_change_finishes_it_when_back(
    tiny_mixtral_dir, expected, tmp_path_factory, monkeypatch, background_rounds
):
    import os
    import signal

    import ray

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    cluster = {"pool_name": "manager-cut-short", "cpus_per_actor": 0.5}
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as llm:
        actors = llm._cluster.expert_actors
        # A change cut short: actor 0 staged a version 1 that hands its experts 2-3 to actor 1, which never staged.
        ray.get(actors[0].stage.remote(1, {0: [0, 1], 1: [0, 1]}))
        generations = background_rounds(lambda: [o.token_ids for o in llm.generate(PROMPTS, PARAMS)])
        generations.wait_for(1)
        os.kill(_manager_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # back, it stages version 2 everywhere, publishes it and retires the rest
            held = [sorted(ray.get(a.layouts.remote())) for a in actors]
            if held == [[2], [2]]:
                break
            time.sleep(0.5)
        assert held == [[2], [2]]
        assert llm.expert_balance()["placement_version"] == 2
        generations.wait_for(len(generations.results) + 1)
        assert all(out == expected for out in generations.stop())
