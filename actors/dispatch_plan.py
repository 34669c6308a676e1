"""Dispatch planning: per-layer lookup tables from a placement, and the actor that serves each choice.

    tables   placement (minus the actors down) -> per layer: each expert's live hosts and their shares,
             each expert's index in its host's stack
    plan     expert ids [T, K] -> actor per choice (a replicated expert's tokens split over its replicas
             by the shares, in token order), and the same with a token's repeats of an actor set to -1
             (a token is sent to an actor once, however many of its experts live there)

A token alone (a decode step of one sequence) is planned in Python from the same tables
(``plan_lone_token``): at one token a layer, a dozen small tensor operations cost more than the
plan itself. It is the general plan at T = 1, except that it spreads the token's choices over
distinct actors where replicas allow (the general plan would send a lone token's choices of
replicated experts all to each expert's first-preferred replica).

Dimensions: T tokens, K chosen per token, E experts, A actors, R max replicas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from moeshard.actors.placement import ExpertPlacement
from moeshard.kernels import Permutation, dedupe_destinations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTable:
    """Dispatch lookup tables of one layer."""

    replicas: torch.Tensor  # [E, R] int64 actor ids hosting each expert, padded with -1
    num_replicas: torch.Tensor  # [E] int64
    local_index: torch.Tensor  # [A, E] int64 position of expert e in actor a's stack, -1 if not hosted
    cum_shares: torch.Tensor  # [E, R] float64 cumulative share of the tokens up to each replica, padded with inf
    single_host: bool  # every expert has one (live) host: R = 1, no shares to split by
    # [E] expert e's live hosts in a token alone's order of preference: plan_dispatch's at T = 1 first,
    # then the other replicas by share (largest first)
    lone_hosts: tuple[tuple[int, ...], ...]
    local_lists: tuple[tuple[int, ...], ...]  # [A][E] local_index as Python ints, for a token alone

    def to(self, device: torch.device) -> "LayerTable":
        """The same tables with their tensors on ``device`` (where the dispatch plans: the coordinator's)."""
        if self.replicas.device == device:
            return self
        return replace(
            self, replicas=self.replicas.to(device), num_replicas=self.num_replicas.to(device),
            local_index=self.local_index.to(device), cum_shares=self.cum_shares.to(device),
        )  # fmt: skip


@dataclass(frozen=True)
class DispatchPlan:
    actor_of: torch.Tensor  # [T, K] int64 actor chosen for each (token, choice)
    send_to: torch.Tensor  # [T, K] int64 actor_of with repeats within a token set to -1


def build_tables(placement: ExpertPlacement, down: frozenset[int] = frozenset()) -> list[LayerTable | None]:
    """Per-layer tables routing around the ``down`` actors wherever an expert has a live replica; None for a dense layer."""
    tables: list[LayerTable | None] = []
    for layer, experts in enumerate(placement.hosts):
        if not experts:
            tables.append(None)
            continue
        shares = placement.shares_of(layer)
        live = [_live(actors, split, down) for actors, split in zip(experts, shares)]  # [E] (hosts, shares) to use
        width = max(len(actors) for actors, _ in live)
        replicas = torch.full((len(experts), width), -1, dtype=torch.int64)
        cum_shares = torch.full((len(experts), width), float("inf"), dtype=torch.float64)
        local_index = torch.full((placement.num_actors, len(experts)), -1, dtype=torch.int64)
        for e, (actors, split) in enumerate(live):
            replicas[e, : len(actors)] = torch.tensor(actors)
            cum_shares[e, : len(actors)] = torch.tensor(split, dtype=torch.float64).cumsum(0)
        for a in range(placement.num_actors):
            hosted = [e for e, actors in enumerate(experts) if a in actors]  # stack order: sorted expert ids
            local_index[a, hosted] = torch.arange(len(hosted))
        num_replicas = torch.tensor([len(actors) for actors, _ in live], dtype=torch.int64)
        tables.append(
            LayerTable(
                replicas=replicas,
                num_replicas=num_replicas,
                local_index=local_index,
                cum_shares=cum_shares,
                single_host=width == 1,
                lone_hosts=tuple(_lone_hosts(actors, split, cum) for (actors, split), cum in zip(live, cum_shares.tolist())),
                local_lists=tuple(tuple(row) for row in local_index.tolist()),
            )
        )
    return tables


def _live(actors: tuple[int, ...], split: tuple[float, ...], down: frozenset[int]) -> tuple[tuple[int, ...], list[float]]:
    """An expert's hosts that are up with their shares renormalised (equal if the live ones had none); all if none is up."""
    keep = [(a, s) for a, s in zip(actors, split) if a not in down] or list(zip(actors, split))
    total = sum(s for _, s in keep)
    shares = [s / total for _, s in keep] if total > 0 else [1.0 / len(keep)] * len(keep)
    return tuple(a for a, _ in keep), shares


def _lone_hosts(actors: tuple[int, ...], shares: list[float], cum_shares: list[float]) -> tuple[int, ...]:
    """An expert's hosts for a token alone: first ``_split_over_replicas``'s with n = 1 (position 0.5), then the
    others by share, largest first (ties: in placement order)."""
    first = min(sum(1 for c in cum_shares if c <= 0.5), len(actors) - 1)  # the same float64 comparison; inf never counts
    rest = sorted((i for i in range(len(actors)) if i != first), key=lambda i: -shares[i])
    return tuple(actors[i] for i in (first, *rest))


def plan_dispatch(table: LayerTable, expert_ids: torch.Tensor, pending: torch.Tensor | None = None) -> DispatchPlan:
    """expert_ids [T, K] -> the actor serving each choice (-1 where not ``pending``).

    The n choices of an expert, in token order, are cut into runs, one per replica, of lengths in proportion
    to the replicas' shares: choice j goes to the replica whose cumulative share first exceeds (j + 0.5) / n.
    Deterministic, and no more than one choice off each share. Without replicas: each expert's host."""
    actor_of = table.replicas[:, 0][expert_ids] if table.single_host else _split_over_replicas(table, expert_ids)  # [T, K]
    if pending is not None:
        actor_of = torch.where(pending, actor_of, -1)
    return DispatchPlan(actor_of=actor_of, send_to=dedupe_destinations(actor_of))


def _split_over_replicas(table: LayerTable, expert_ids: torch.Tensor) -> torch.Tensor:
    """expert_ids [T, K] -> actor [T, K]: each expert's choices cut into runs by its replicas' shares."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*K] token-major
    order = torch.sort(flat, stable=True).indices  # [T*K] grouped by expert, token order within
    counts = torch.bincount(flat, minlength=table.replicas.shape[0])  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device) - starts[flat[order]]  # [T*K] j among its expert's choices
    position = (rank.double() + 0.5) / counts[flat].double()  # [T*K] in (0, 1)
    replica = (table.cum_shares[flat] <= position[:, None]).sum(dim=1)  # [T*K] first replica whose cumulative share > position
    replica = torch.minimum(replica, table.num_replicas[flat] - 1)  # float rounding at the last share
    return table.replicas[flat, replica].reshape(t, k)


@dataclass(frozen=True)
class LoneTokenPlan:
    """``DispatchPlan`` of a token alone, with its choices also as Python ints."""

    plan: DispatchPlan  # actor_of and send_to [1, K]
    expert_ids: tuple[int, ...]  # [K]
    actor_of: tuple[int, ...]  # [K]
    send_to: tuple[int, ...]  # [K] actor_of with repeats set to -1

    @property
    def actors(self) -> list[int]:
        """The actors sent the token, ascending (the permutation's order)."""
        return sorted(a for a in self.send_to if a >= 0)


def plan_lone_token(table: LayerTable, expert_ids: list[int], device: torch.device = torch.device("cpu")) -> LoneTokenPlan:
    """A token alone, all choices pending: expert_ids [K] -> actor per choice, spread over distinct actors where the
    replicas allow. Choice j goes to its expert's first preferred host (``plan_dispatch``'s at T = 1) unless an earlier
    choice of the token went there and another replica is free: then to the free one with the largest share. One
    actor computes at most one of the token's experts where it can, so a layer waits for one expert, not two in a row.
    Without replicas this is ``plan_dispatch`` at T = 1."""
    actor_of: list[int] = []
    for e in expert_ids:
        hosts = table.lone_hosts[e]
        actor_of.append(next((a for a in hosts if a not in actor_of), hosts[0]))
    send_to = tuple(-1 if a in actor_of[:j] else a for j, a in enumerate(actor_of))
    plan = DispatchPlan(
        actor_of=torch.tensor([actor_of], dtype=torch.int64, device=device), send_to=torch.tensor([send_to], dtype=torch.int64, device=device)
    )
    return LoneTokenPlan(plan, tuple(expert_ids), tuple(actor_of), send_to)


def permute_lone_token(hidden: torch.Tensor, lone: LoneTokenPlan, num_actors: int) -> Permutation:
    """``permute(hidden, send_to, num_actors)`` for hidden [1, D]: one row per actor sent, in actor order.
    The rows are views of the token's row (nothing is copied)."""
    actors, device = lone.actors, hidden.device
    row_of = {a: n for n, a in enumerate(actors)}
    offsets = [0]
    for a in range(num_actors):
        offsets.append(offsets[-1] + (a in row_of))
    return Permutation(
        rows=hidden.expand(len(actors), -1),  # [N, D]
        expert_offsets=torch.tensor(offsets, dtype=torch.int64, device=device),  # [A + 1]
        source_token=torch.zeros(len(actors), dtype=torch.int64, device=device),  # [N]
        slot=torch.tensor([[row_of.get(a, -1) for a in lone.send_to]], dtype=torch.int64, device=device),  # [1, K]
        host_offsets=tuple(offsets),
    )
