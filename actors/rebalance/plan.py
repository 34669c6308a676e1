"""A balanced placement from measured expert load: greedy packing in the spirit of DeepSeek's EPLB.

Plain data, no Ray. Per MoE layer, with E + R slots spread over A actors (``actor_slots``):

    1. replicas   every expert gets one slot; each of the R spare slots goes to the expert with the
                  largest load per replica (ties: the lower id), never more replicas than actors
    2. pack       replicas, heaviest first (load / replicas each), go to the actor with the least
                  expected load that has a free slot and does not host the expert yet (longest
                  processing time first); an actor that hosted the expert before wins when it is within
                  ``stay_tolerance`` of the best, so experts stay where they are unless moving them pays
    3. shares     a replicated expert's tokens are split over its replicas to even out the expected
                  load of their actors (water-filling, a few rounds): the dispatch spreads by these
    4. keep       a layer whose new layout is not ``min_gain`` better than its old one keeps the old
                  hosts (with shares recomputed for the new load)

Expected load is counted in (token, expert) choices; imbalance is max / mean of the actors' loads.

Dimensions: E experts, A actors, R redundant slots per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshard.actors.placement import ExpertPlacement, PlacementError

SHARE_ROUNDS = 3


@dataclass(frozen=True)
class BalancedLayer:
    hosts: tuple[tuple[int, ...], ...]  # [E] actors hosting each expert
    shares: tuple[tuple[float, ...], ...]  # [E] fraction of the expert's tokens per host
    actor_load: tuple[float, ...]  # [A] expected choices per actor under this layout


@dataclass(frozen=True)
class BalancePlan:
    placement: ExpertPlacement  # the next version
    before: tuple[float, ...]  # [L] imbalance of the old layout under the measured load (0 for a dense layer)
    after: tuple[float, ...]  # [L] imbalance of the new layout under the same load
    moved: int  # (layer, expert, actor) replicas that are new


def actor_slots(num_experts: int, redundant: int, num_actors: int) -> tuple[int, ...]:
    """Experts each actor holds per layer: E + R slots spread as evenly as they go."""
    if redundant < 0 or redundant > num_experts * (num_actors - 1):
        raise PlacementError(
            f"redundant_experts must be between 0 and {num_experts * (num_actors - 1)} for {num_experts} experts "
            f"on {num_actors} actors, got {redundant}"
        )
    total = num_experts + redundant
    return tuple(total // num_actors + (1 if a < total % num_actors else 0) for a in range(num_actors))


def imbalance(actor_load: tuple[float, ...] | list[float]) -> float:
    """max / mean of the actors' loads; 0 when nothing ran."""
    total = sum(actor_load)
    return max(actor_load) * len(actor_load) / total if total > 0 else 0.0


def replica_counts(load: list[float], spare: int, num_actors: int) -> list[int]:
    """Step 1: one replica each, then every spare slot to the largest load per replica."""
    counts = [1] * len(load)
    for _ in range(spare):
        open_ = [e for e in range(len(load)) if counts[e] < num_actors]
        if not open_:
            break
        best = max(open_, key=lambda e: (load[e] / counts[e], -e))
        counts[best] += 1
    return counts


def balance_layer(
    load: list[float],
    previous: tuple[tuple[int, ...], ...],
    slots: tuple[int, ...],
    stay_tolerance: float = 0.1,
    min_gain: float = 0.05,
) -> BalancedLayer:
    """Steps 1-4 for one layer: ``load`` [E] choices measured per expert, ``previous`` [E] its hosts now."""
    num_actors = len(slots)
    kept = _with_shares(load, previous, num_actors)
    if sum(load) <= 0:
        return kept
    counts = replica_counts(load, sum(slots) - len(load), num_actors)
    hosts = _pack(load, counts, previous, slots, stay_tolerance)
    fresh = _with_shares(load, hosts, num_actors)
    if max(fresh.actor_load) >= max(kept.actor_load) * (1.0 - min_gain):
        return kept
    return fresh


def _pack(
    load: list[float], counts: list[int], previous: tuple[tuple[int, ...], ...], slots: tuple[int, ...], tolerance: float
) -> tuple[tuple[int, ...], ...]:
    """Step 2: replicas heaviest first onto the least loaded actor with room, staying put when nearly as good."""
    num_actors = len(slots)
    items = sorted(((load[e] / counts[e], e) for e in range(len(load)) for _ in range(counts[e])), key=lambda it: (-it[0], it[1]))
    bonus = tolerance * sum(load) / num_actors
    actor_load = [0.0] * num_actors
    free = list(slots)
    hosts: list[list[int]] = [[] for _ in load]
    for weight, e in items:
        open_ = [a for a in range(num_actors) if free[a] > 0 and a not in hosts[e]]
        if not open_:
            open_ = [_make_room(e, hosts, free, actor_load, [load[x] / counts[x] for x in range(len(load))])]
        best = min(open_, key=lambda a: (actor_load[a], a))
        staying = [a for a in open_ if a in previous[e] and actor_load[a] <= actor_load[best] + bonus]
        chosen = min(staying, key=lambda a: (actor_load[a], a)) if staying else best
        hosts[e].append(chosen)
        actor_load[chosen] += weight
        free[chosen] -= 1
    return tuple(tuple(sorted(h)) for h in hosts)


def _make_room(e: int, hosts: list[list[int]], free: list[int], actor_load: list[float], per_replica: list[float]) -> int:
    """Every actor with a free slot already hosts ``e``: move another expert there from an actor that does not."""
    num_actors = len(free)
    for full in range(num_actors):
        if full in hosts[e]:
            continue
        for roomy in (a for a in range(num_actors) if free[a] > 0):
            for other, where in enumerate(hosts):
                if full in where and roomy not in where:
                    where[where.index(full)] = roomy
                    free[roomy], free[full] = free[roomy] - 1, free[full] + 1
                    actor_load[roomy] += per_replica[other]
                    actor_load[full] -= per_replica[other]
                    return full
    raise PlacementError(f"no actor can take another replica of expert {e}")


def _with_shares(load: list[float], hosts: tuple[tuple[int, ...], ...], num_actors: int) -> BalancedLayer:
    """Step 3: split each replicated expert's load over its hosts so that their actors' loads even out."""
    split = [[load[e] / len(h)] * len(h) for e, h in enumerate(hosts)]  # [E][i] load sent to hosts[e][i]
    actor_load = [0.0] * num_actors
    for h, parts in zip(hosts, split):
        for a, part in zip(h, parts):
            actor_load[a] += part
    replicated = sorted((e for e, h in enumerate(hosts) if len(h) > 1), key=lambda e: (-load[e], e))
    for _ in range(SHARE_ROUNDS):
        for e in replicated:
            base = [actor_load[a] - part for a, part in zip(hosts[e], split[e])]
            split[e] = _water_fill(base, load[e])
            for a, b, part in zip(hosts[e], base, split[e]):
                actor_load[a] = b + part
    shares = tuple(
        tuple(part / load[e] for part in parts) if load[e] > 0 else tuple(1.0 / len(parts) for _ in parts)
        for e, parts in enumerate(split)
    )
    return BalancedLayer(hosts=hosts, shares=_normalised(shares), actor_load=tuple(actor_load))


def _water_fill(base: list[float], amount: float) -> list[float]:
    """x >= 0 with sum(x) = amount that makes base + x as even as it can (raise the lowest first)."""
    order = sorted(range(len(base)), key=lambda i: (base[i], i))
    level, used = base[order[0]], 0
    for n, i in enumerate(order, start=1):
        nxt = base[order[n]] if n < len(order) else float("inf")
        if (nxt - level) * n >= amount - used:
            level += (amount - used) / n
            break
        used += (nxt - level) * n
        level = nxt
    return [max(0.0, level - b) for b in base]


def _normalised(shares: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Rounded to 6 places, summing to exactly 1 (the placement checks the sum)."""
    out = []
    for split in shares:
        rounded = [round(s, 6) for s in split]
        rounded[-1] = max(0.0, 1.0 - sum(rounded[:-1]))
        out.append(tuple(rounded))
    return tuple(out)


def expected_load(load: list[float], hosts: tuple[tuple[int, ...], ...], shares, num_actors: int) -> tuple[float, ...]:
    """[A] expected choices per actor when expert e's ``load[e]`` is split by ``shares[e]``."""
    actor_load = [0.0] * num_actors
    for e, (h, split) in enumerate(zip(hosts, shares)):
        for a, s in zip(h, split):
            actor_load[a] += load[e] * s
    return tuple(actor_load)


def plan_rebalance(
    placement: ExpertPlacement, load: torch.Tensor, slots: tuple[int, ...], stay_tolerance: float = 0.1, min_gain: float = 0.05
) -> BalancePlan:
    """The next placement for ``load`` [L, E] (choices per expert measured since the last one)."""
    assert load.dim() == 2 and load.shape[0] == placement.num_layers, f"load {tuple(load.shape)} for {placement.num_layers} layers"
    hosts, shares, before, after, moved = [], [], [], [], 0
    for layer, previous in enumerate(placement.hosts):
        if not previous:
            hosts.append(())
            shares.append(())
            before.append(0.0)
            after.append(0.0)
            continue
        layer_load = [float(x) for x in load[layer, : len(previous)]]  # [E]
        old = expected_load(layer_load, previous, placement.shares_of(layer), placement.num_actors)
        new = balance_layer(layer_load, previous, slots, stay_tolerance, min_gain)
        hosts.append(new.hosts)
        shares.append(new.shares)
        before.append(imbalance(old))
        after.append(imbalance(new.actor_load))
        moved += sum(len(set(h) - set(p)) for h, p in zip(new.hosts, previous))
    next_placement = ExpertPlacement(
        num_actors=placement.num_actors, hosts=tuple(hosts), shares=tuple(shares), version=placement.version + 1
    )
    return BalancePlan(next_placement, tuple(before), tuple(after), moved)


def initial_placement(
    num_layers: int, num_experts: int, num_actors: int, redundant: int, dense_layers: tuple[int, ...] = ()
) -> ExpertPlacement:
    """Every slot filled before any load is measured: what the packing gives for uniform load (the spare slots
    hold replicas of the lowest-numbered experts; ties go to the contiguous blocks' actors), equal shares."""
    slots = actor_slots(num_experts, redundant, num_actors)
    even = ExpertPlacement.even(num_layers, num_experts, min(num_actors, num_experts), dense_layers)
    previous = tuple(tuple(actors) for actors in next((e for e in even.hosts if e), ()))
    counts = replica_counts([1.0] * num_experts, redundant, num_actors)
    per_expert = _pack([1.0] * num_experts, counts, previous, slots, tolerance=0.0)
    hosts = tuple(() if layer in dense_layers else per_expert for layer in range(num_layers))
    return ExpertPlacement(num_actors=num_actors, hosts=hosts)
