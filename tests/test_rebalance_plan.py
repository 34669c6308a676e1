"""The rebalance's placement algorithm and the proportional spread of a replicated expert's tokens (no Ray)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeshard.actors.dispatch_plan import build_tables, permute_lone_token, plan_dispatch, plan_lone_token
from moeshard.actors.placement import ExpertPlacement, PlacementError
from moeshard.actors.rebalance.meter import LoadMeter
from moeshard.actors.rebalance.plan import (
    actor_slots,
    balance_layer,
    expected_load,
    imbalance,
    initial_placement,
    plan_rebalance,
    replica_counts,
)
from moeshard.kernels import permute

SKEWED = [1000.0, 600.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0]  # two hot experts of eight


def _per_actor_counts(hosts, num_actors: int) -> list[int]:
    counts = [0] * num_actors
    for actors in hosts:
        for a in actors:
            counts[a] += 1
    return counts


def test_slots_spread_the_redundant_experts_and_bound_them():
    assert actor_slots(8, 4, 4) == (3, 3, 3, 3)
    assert actor_slots(8, 3, 4) == (3, 3, 3, 2)
    assert actor_slots(8, 0, 3) == (3, 3, 2)
    with pytest.raises(PlacementError, match="between 0 and 24"):
        actor_slots(8, 25, 4)


def test_spare_slots_go_to_the_hottest_experts_by_load_per_replica():
    # 1000 -> 500 (a 2nd replica), 600 -> 300, 500 -> 333, 333 > 300 -> 250
    assert replica_counts(SKEWED, 4, 4) == [4, 2, 1, 1, 1, 1, 1, 1]
    assert replica_counts(SKEWED, 2, 4) == [2, 2, 1, 1, 1, 1, 1, 1]
    assert replica_counts([10.0, 1.0], 2, 3) == [3, 1]
    assert replica_counts([10.0, 1.0], 5, 3) == [3, 3]  # never more replicas than actors


def test_rebalance_evens_out_a_skewed_layer_within_capacity():
    start = initial_placement(2, 8, 4, redundant=4)
    slots = actor_slots(8, 4, 4)
    plan = plan_rebalance(start, torch.tensor([SKEWED, SKEWED[::-1]]), slots)
    for layer in range(2):
        hosts = plan.placement.hosts[layer]
        assert all(count <= cap for count, cap in zip(_per_actor_counts(hosts, 4), slots))  # capacity respected
        assert sum(len(h) for h in hosts) == 12  # every slot used
        assert all(len(set(h)) == len(h) for h in hosts)
        assert plan.after[layer] < plan.before[layer]
        assert plan.after[layer] < 1.05  # 2000 choices over 4 actors, within 5% of perfect
    hot = plan.placement.hosts[0]
    assert len(hot[0]) == 4 and len(hot[1]) == 2  # the replicas went to the two hot experts
    assert len(plan.placement.hosts[1][7]) == 4  # in the other layer the hot expert is 7
    assert plan.placement.version == start.version + 1


@pytest.mark.parametrize("num_actors", [2, 3, 4, 5])
def test_every_slot_count_gives_a_valid_placement_and_rebalance(num_actors):
    generator = torch.Generator().manual_seed(num_actors)
    for redundant in range(0, 8 * (num_actors - 1) + 1, 3):
        slots = actor_slots(8, redundant, num_actors)
        start = initial_placement(2, 8, num_actors, redundant)
        for placement in (start, plan_rebalance(start, torch.rand(2, 8, generator=generator) ** 4 * 1000, slots).placement):
            for hosts in placement.hosts:
                assert sum(len(h) for h in hosts) == 8 + redundant
                assert all(count <= cap for count, cap in zip(_per_actor_counts(hosts, num_actors), slots))


@pytest.mark.parametrize("num_actors,redundant,worst", [(2, 1, 1.125), (2, 2, 1.0), (3, 1, 1.125), (4, 4, 1.0), (4, 8, 1.0)])
def test_the_initial_placement_is_balanced_for_uniform_load(num_actors, redundant, worst):
    start = initial_placement(1, 8, num_actors, redundant)  # worst: half a replica over perfect, where slots are odd
    assert imbalance(expected_load([1.0] * 8, start.hosts[0], start.shares_of(0), num_actors)) == pytest.approx(worst)


def test_a_balanced_placement_stays_where_it_is():
    even = ExpertPlacement.even(2, 8, 4)
    plan = plan_rebalance(even, torch.full((2, 8), 100.0), actor_slots(8, 0, 4))
    assert plan.placement.hosts == even.hosts
    assert plan.moved == 0
    assert plan.before == plan.after == (1.0, 1.0)


def test_a_rebalanced_placement_is_not_moved_again_for_the_same_load():
    start = initial_placement(1, 8, 4, redundant=4)
    slots = actor_slots(8, 4, 4)
    first = plan_rebalance(start, torch.tensor([SKEWED]), slots)
    second = plan_rebalance(first.placement, torch.tensor([SKEWED]), slots)
    assert first.moved > 0
    assert second.moved == 0 and second.placement.hosts == first.placement.hosts


def test_without_spare_slots_the_hot_experts_are_separated():
    even = ExpertPlacement.even(1, 8, 4)  # experts 0 and 1 share actor 0
    load = torch.tensor([[100.0, 90.0, 1, 1, 1, 1, 1, 1]])
    plan = plan_rebalance(even, load, actor_slots(8, 0, 4))
    hosts = plan.placement.hosts[0]
    assert hosts[0] != hosts[1]
    assert plan.after[0] < plan.before[0]
    assert _per_actor_counts(hosts, 4) == [2, 2, 2, 2]


def test_an_expert_stays_on_its_actor_when_moving_it_does_not_pay():
    previous = ((0,), (0,), (1,), (1,))  # loads 10+10 on actor 0, 10+11 on actor 1: within tolerance
    layer = balance_layer([10.0, 10.0, 10.0, 11.0], previous, (2, 2))
    assert layer.hosts == previous


def test_shares_even_out_the_actors_of_a_replicated_expert():
    # expert 0 on actors 0 and 1; actor 1 also hosts expert 1 (load 40): expert 0's 100 go 70/30.
    hosts = ((0, 1), (1,))
    layer = balance_layer([100.0, 40.0], hosts, (1, 2), min_gain=1.0)  # keep the hosts, recompute the shares
    assert layer.hosts == hosts
    assert layer.shares[0] == pytest.approx((0.7, 0.3))
    assert layer.actor_load == pytest.approx((70.0, 70.0))
    assert expected_load([100.0, 40.0], hosts, layer.shares, 2) == pytest.approx((70.0, 70.0))
    assert imbalance(layer.actor_load) == pytest.approx(1.0)


def test_no_load_keeps_the_placement():
    start = initial_placement(1, 8, 4, redundant=4)
    plan = plan_rebalance(start, torch.zeros(1, 8), actor_slots(8, 4, 4))
    assert plan.placement.hosts == start.hosts and plan.moved == 0


def test_dense_layers_stay_empty():
    start = initial_placement(3, 8, 2, redundant=2, dense_layers=(1,))
    assert start.hosts[1] == ()
    plan = plan_rebalance(start, torch.tensor([SKEWED, [0.0] * 8, SKEWED]), actor_slots(8, 2, 2))
    assert plan.placement.hosts[1] == () and plan.after[1] == 0.0


def test_dispatch_spreads_a_replicated_expert_by_its_shares():
    hosts = ((0, 1, 2), (3,))
    placement = ExpertPlacement(num_actors=4, hosts=(hosts,), shares=(((0.5, 0.25, 0.25), (1.0,)),))
    (table,) = build_tables(placement)
    expert_ids = torch.tensor([[0, 1]] * 40)  # [T=40, K=2]: 40 choices of expert 0
    plan = plan_dispatch(table, expert_ids)
    counts = torch.bincount(plan.actor_of[:, 0], minlength=4).tolist()
    assert counts == [20, 10, 10, 0]
    assert (plan.actor_of[:, 1] == 3).all()
    assert torch.equal(plan_dispatch(table, expert_ids).actor_of, plan.actor_of)  # deterministic


def test_dispatch_shares_are_renormalised_over_live_replicas():
    placement = ExpertPlacement(num_actors=3, hosts=(((0, 1, 2),),), shares=(((0.5, 0.25, 0.25),),))
    (table,) = build_tables(placement, down=frozenset({0}))
    plan = plan_dispatch(table, torch.zeros(8, 1, dtype=torch.int64))
    assert torch.bincount(plan.actor_of[:, 0], minlength=3).tolist() == [0, 4, 4]


def test_equal_shares_split_evenly_in_token_order():
    placement = ExpertPlacement.from_expert_map(1, 2, 2, {0: [0, 1], 1: [1]})
    (table,) = build_tables(placement)
    plan = plan_dispatch(table, torch.zeros(6, 1, dtype=torch.int64))
    assert plan.actor_of[:, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_without_replicas_each_choice_goes_to_its_experts_host():
    placement = ExpertPlacement.from_expert_map(1, 8, 3, {e: [e % 3] for e in range(8)})
    (table,) = build_tables(placement)
    assert table.single_host
    expert_ids = torch.randint(0, 8, (50, 2), generator=torch.Generator().manual_seed(0))  # [T, K]
    pending = torch.rand(50, 2, generator=torch.Generator().manual_seed(1)) < 0.7
    plan = plan_dispatch(table, expert_ids, pending)
    assert torch.equal(plan.actor_of, torch.where(pending, expert_ids % 3, -1))
    general = replace(table, single_host=False)  # the split by shares, which one host must reduce to
    assert torch.equal(plan_dispatch(general, expert_ids, pending).actor_of, plan.actor_of)
    assert not build_tables(ExpertPlacement.from_expert_map(1, 2, 2, {0: [0, 1], 1: [1]}))[0].single_host


def test_meter_counts_choices_rows_and_steps():
    clock = iter(range(100)).__next__
    meter = LoadMeter(num_layers=2, num_experts=4, num_actors=2, clock=clock)
    expert_ids = torch.tensor([[0, 1], [0, 2], [3, 0]])  # [T=3, K=2]
    send_to = torch.tensor([[0, -1], [0, 1], [1, 0]])  # a repeat within token 0 is not sent twice
    meter.record(0, expert_ids, send_to, first_layer=True)
    meter.record(1, expert_ids, send_to, first_layer=False)
    window = meter.window(reset=True)
    assert window.expert_choices[0].tolist() == [3, 1, 1, 1]
    assert window.actor_rows[1].tolist() == [3, 2]
    assert window.steps == 1
    assert window.rows_per_step() == [6.0, 4.0]
    assert window.imbalance() == pytest.approx([1.2, 1.2])
    assert meter.window().steps == 0 and meter.window().expert_choices.sum() == 0


def test_meter_folds_queued_layers_into_the_same_counts():
    """Layers are queued and counted every FOLD_EVERY records or when read: the counts, the steps and the
    delta a shared pool takes equal a per-layer count; a resize drops what was queued for the old actors."""
    layers, experts, actors = 3, 8, 3
    meter = LoadMeter(num_layers=layers, num_experts=experts, num_actors=actors, clock=iter(range(1000)).__next__)
    g = torch.Generator().manual_seed(0)
    want_choices = torch.zeros(layers, experts, dtype=torch.int64)
    want_rows = torch.zeros(layers, actors, dtype=torch.int64)
    steps = 0
    for i in range(LoadMeter.FOLD_EVERY * 2 + 5):  # two folds on record, the rest on read
        layer, tokens = i % layers, 1 + i % 5
        expert_ids = torch.rand(tokens, experts, generator=g).topk(2, dim=1).indices  # [T, 2]
        send_to = torch.randint(-1, actors, (tokens, 2), generator=g)  # [T, 2]
        meter.record(layer, expert_ids, send_to, first_layer=layer == 0)
        want_choices[layer] += torch.bincount(expert_ids.reshape(-1), minlength=experts)
        want_rows[layer] += torch.bincount(send_to[send_to >= 0], minlength=actors)
        steps += layer == 0
    window = meter.window()
    assert torch.equal(window.expert_choices, want_choices) and torch.equal(window.actor_rows, want_rows)
    assert window.steps == steps
    delta = meter.take()
    assert torch.equal(delta.expert_choices, want_choices) and torch.equal(delta.actor_rows, want_rows)
    assert delta.steps == steps and meter.take() is None

    with torch.inference_mode():  # the engine records, and resizes between steps, in inference mode
        meter.record(0, torch.tensor([[0, 1]]), torch.tensor([[0, 2]]), first_layer=True)
        meter.resize(2)
        meter.record(1, torch.tensor([[4, 5]]), torch.tensor([[1, -1]]), first_layer=False)
    assert meter.take().actor_rows[1].tolist() == [0, 1]  # folded here, outside it
    window = meter.window()
    assert window.actor_rows.shape == (layers, 2) and window.steps == 0 and window.expert_choices.sum() == 2


def test_shares_must_split_each_expert():
    with pytest.raises(ValueError, match="do not split"):
        ExpertPlacement(num_actors=2, hosts=(((0, 1),),), shares=(((0.5, 0.6),),))


@pytest.mark.parametrize("seed", range(6))
def test_a_token_alone_is_planned_as_the_general_path_does_but_spread_over_free_replicas(seed):
    """plan_lone_token / permute_lone_token (Python ints) against plan_dispatch / permute at T = 1: replicas with
    uneven shares (some at exactly one half), a host down, E = 16, K = 4. A choice goes where the general plan sends
    it unless an earlier choice of the token took that actor and a replica of its expert was free."""
    gen = torch.Generator().manual_seed(seed)
    E, K, A = 16, 4, 5
    hosts, shares = [], []
    for e in range(E):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        actors = torch.randperm(A, generator=gen)[:n].tolist()
        split = [0.5, 0.5] if n == 2 and e % 4 == 0 else (torch.rand(n, generator=gen) + 0.1).tolist()
        hosts.append(tuple(actors))
        shares.append(tuple(s / sum(split) for s in split))
    placement = ExpertPlacement(num_actors=A, hosts=(tuple(hosts),), shares=(tuple(shares),))
    hidden = torch.randn(1, 8, generator=gen)  # [1, D]
    spread = 0
    for down in (frozenset(), frozenset({seed % A})):
        (table,) = build_tables(placement, down)
        for _ in range(50):
            expert_ids = torch.randperm(E, generator=gen)[:K].reshape(1, K)  # [1, K] distinct, as top-k gives
            lone = plan_lone_token(table, expert_ids[0].tolist())
            general = plan_dispatch(table, expert_ids).actor_of[0].tolist()
            for j, e in enumerate(expert_ids[0].tolist()):
                live = [a for a in placement.hosts[0][e] if a not in down] or list(placement.hosts[0][e])
                free = [a for a in live if a not in lone.actor_of[:j]]
                if lone.actor_of[j] != general[j]:
                    spread += 1
                    assert general[j] in lone.actor_of[:j] and lone.actor_of[j] in free
                    share = dict(zip(placement.hosts[0][e], placement.shares[0][e]))
                    assert share[lone.actor_of[j]] == max(share[a] for a in free)
                else:
                    assert general[j] not in lone.actor_of[:j] or not free
            assert list(lone.send_to) == [-1 if a in lone.actor_of[:j] else a for j, a in enumerate(lone.actor_of)]
            assert lone.plan.actor_of[0].tolist() == list(lone.actor_of) and lone.plan.send_to[0].tolist() == list(lone.send_to)
            perm, expected = permute_lone_token(hidden, lone, A), permute(hidden, lone.plan.send_to, A)
            assert torch.equal(perm.rows, expected.rows) and torch.equal(perm.expert_offsets, expected.expert_offsets)
            assert torch.equal(perm.source_token, expected.source_token) and torch.equal(perm.slot, expected.slot)
    assert spread > 0


def test_a_token_alone_takes_two_actors_when_every_expert_is_on_both():
    """With every expert replicated on both actors, a lone token's two experts run on two actors, whatever the
    shares (the general plan at T = 1 sends both to the same replica)."""
    placement = ExpertPlacement.from_expert_map(1, 8, 2, {e: [0, 1] for e in range(8)})
    (table,) = build_tables(placement)
    for first in range(8):
        for second in range(8):
            if first != second:
                assert sorted(plan_lone_token(table, [first, second]).actor_of) == [0, 1]
    assert plan_dispatch(table, torch.tensor([[0, 1]])).actor_of.tolist() == [[1, 1]]
    (table,) = build_tables(placement, down=frozenset({1}))
    assert plan_lone_token(table, [2, 5]).actor_of == (0, 0)
