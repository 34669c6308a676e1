"""Routing statistics of one MoE layer, as in the Mixtral paper's routing analysis (section 5).

Over the expert ids a layer chose for a run of tokens, ``ids [T, K]`` (first choice first):

    expert_share[e] = #{(t, j): ids[t, j] == e} / (T * K)          each expert's share of routed (token, choice) pairs
    same_top1       = mean_t [ids[t, 0] == ids[t - 1, 0]]          consecutive tokens keep the first-choice expert
    shared_any      = mean_t [set(ids[t]) & set(ids[t - 1]) != {}] consecutive tokens' chosen sets intersect

and what a router choosing uniformly at random would give: 1/E and 1 - C(E-k, k) / C(E, k)
(12.5% and 46.4% for Mixtral's 8 experts, top-2).

Dimensions: T tokens, P consecutive pairs, E experts, K chosen per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class PairFlags(NamedTuple):
    """Per consecutive token pair (previous, current)."""

    same_top1: torch.Tensor  # [P] bool: the same first-choice expert
    shared_any: torch.Tensor  # [P] bool: at least one expert chosen by both


class PairCounts(NamedTuple):
    """Counts over consecutive pairs; the rates are None when there is no pair."""

    pairs: int
    same_top1: int
    shared_any: int

    def __add__(self, other: "PairCounts") -> "PairCounts":  # type: ignore[override]
        return PairCounts(self.pairs + other.pairs, self.same_top1 + other.same_top1, self.shared_any + other.shared_any)

    @property
    def same_top1_rate(self) -> float | None:
        return self.same_top1 / self.pairs if self.pairs else None

    @property
    def shared_any_rate(self) -> float | None:
        return self.shared_any / self.pairs if self.pairs else None


class RandomBaseline(NamedTuple):
    """The rates of a router that picks k of E experts uniformly at random, independently per token."""

    same_top1: float
    shared_any: float


NO_PAIRS = PairCounts(0, 0, 0)


def random_baseline(num_experts: int, k: int) -> RandomBaseline:
    """1/E, and 1 - C(E-k, k) / C(E, k): one minus the chance that two random k-sets are disjoint."""
    if not 0 < k <= num_experts:
        raise ValueError(f"top-k must be in 1..{num_experts}, got {k}")
    disjoint = math.comb(num_experts - k, k) / math.comb(num_experts, k)  # comb is 0 when E - k < k
    return RandomBaseline(same_top1=1.0 / num_experts, shared_any=1.0 - disjoint)


def expert_share(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [T, K] -> float64 [E]: each expert's share of the T * K routed (token, choice) pairs (zeros when T = 0)."""
    assert ids.dim() == 2, f"expert ids must be [T, K], got {tuple(ids.shape)}"
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=num_experts).double()  # [E]
    return counts / max(ids.numel(), 1)


def pair_flags(previous: torch.Tensor, current: torch.Tensor) -> PairFlags:
    """previous [..., P, K], current [..., P, K] (each row first choice first) -> per-pair flags [..., P]."""
    assert previous.shape == current.shape and previous.dim() >= 2, f"{tuple(previous.shape)} vs {tuple(current.shape)}"
    same_top1 = previous[..., 0] == current[..., 0]  # [..., P]
    shared_any = (current[..., :, None] == previous[..., None, :]).flatten(-2).any(dim=-1)  # [..., P, K, K] -> [..., P]
    return PairFlags(same_top1, shared_any)


def consecutive_counts(ids: torch.Tensor) -> PairCounts:
    """ids [T, K] of one run of consecutive tokens -> counts over its T - 1 pairs."""
    assert ids.dim() == 2, f"expert ids must be [T, K], got {tuple(ids.shape)}"
    if ids.shape[0] < 2:
        return NO_PAIRS
    flags = pair_flags(ids[:-1], ids[1:])  # pairs (t - 1, t)
    return PairCounts(ids.shape[0] - 1, int(flags.same_top1.sum()), int(flags.shared_any.sum()))
