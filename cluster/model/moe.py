"""The sparse MoE block's expert side: an injected experts function and the local one.

The model computes the route (router logits -> top-k weights and expert ids)
and hands the rest to an ``ExpertsFn``: dispatch -> experts -> combine. In one
process that is ``LocalExperts``; in the cluster it is the coordinator's
all-to-all over expert actors, which must return the same numbers.

``submit`` starts a layer's experts and returns a ``PendingExperts``: the model
runs the shared expert while the expert actors work, then ``wait``s.

Dimensions: T tokens, N rows (token, expert) pairs, D hidden, I expert hidden,
E experts of a layer, El experts hosted here, K chosen per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from moeshard.cluster.model.checkpoint import CheckpointReader, ExpertKey
from moeshard.kernels import RouterOutput, combine, expert_ffn, permute
from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.combine import weighted_row_sum
from moeshard.kernels.expert_ffn import expert_rows_torch


class PendingExperts(Protocol):
    def wait(self) -> torch.Tensor:
        """The experts' output [T, D], once every expert has answered."""
        ...


class ExpertsFn(Protocol):
    def submit(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> PendingExperts:
        """Start hidden [T, D], routing ([T, K] weights and expert ids) on the experts; returns before they finish."""
        ...

    def __call__(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """hidden [T, D], routing ([T, K] weights and expert ids) -> sum_j w[t, j] * Expert_{ids[t, j]}(x_t) [T, D]."""
        ...


@dataclass(frozen=True)
class Done:
    """Experts already computed (in this process)."""

    output: torch.Tensor  # [T, D]

    def wait(self) -> torch.Tensor:
        return self.output


@dataclass
class ExpertStack:
    """Some experts of one layer, stacked so a grouped FFN can run over them."""

    expert_ids: tuple[int, ...]  # global ids of the hosted experts, in stack order
    w1: torch.Tensor  # [El, I, D]
    w3: torch.Tensor  # [El, I, D]
    w2: torch.Tensor  # [El, D, I]

    def run(self, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], local_ids [T, K] (stack index, -1 = not here), weights [T, K] -> weighted sum [T, D]."""
        assert hidden.dim() == 2 and local_ids.shape == weights.shape and local_ids.shape[0] == hidden.shape[0]
        if hidden.shape[0] == 1 and resolve_backend("auto", hidden.device) == "torch":
            return self._run_one_token(hidden, local_ids, weights)
        perm = permute(hidden, local_ids, len(self.expert_ids))  # rows [N, D] grouped by hosted expert
        out = expert_ffn(perm.rows, perm.expert_offsets, self.w1, self.w3, self.w2)  # [N, D]
        return combine(out, weights, perm)  # [T, D]

    def _run_one_token(self, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``run`` for a token alone (decode at batch 1): each chosen expert on its row, nothing to group,
        summed as ``combine`` sums (float32, in j order). ~0.4 ms less per call than permute + combine on CPU."""
        chosen = (
            (j, expert_rows_torch(hidden, self.w1[e], self.w3[e], self.w2[e]))  # [1, D]
            for j, e in enumerate(local_ids[0].tolist())
            if e >= 0
        )
        return weighted_row_sum(chosen, weights, hidden.shape[1], hidden.device).to(hidden.dtype)

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.w1, self.w3, self.w2))


def load_expert_stacks(
    reader: CheckpointReader, hosted: dict[int, Iterable[int]], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[int, ExpertStack]:
    """Read the experts hosted per layer ({layer: expert ids}) and stack them on ``device``, one stack per layer."""
    wanted = [ExpertKey(layer, e) for layer, experts in hosted.items() for e in experts]
    weights = reader.read_experts(wanted, dtype, device)
    stacks = {}
    for layer, experts in hosted.items():
        ids = tuple(sorted(set(experts)))
        if not ids:
            continue
        parts = [weights[ExpertKey(layer, e)] for e in ids]
        stacks[layer] = ExpertStack(
            expert_ids=ids,
            w1=torch.stack([p.w1 for p in parts]),
            w3=torch.stack([p.w3 for p in parts]),
            w2=torch.stack([p.w2 for p in parts]),
        )
    return stacks


class LocalExperts:
    """Every expert of every layer in this process: the reference experts function."""

    def __init__(self, stacks: dict[int, ExpertStack]):
        self.stacks = stacks

    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader, dtype: torch.dtype, device: torch.device | str = "cpu") -> "LocalExperts":
        config = reader.config
        hosted = {layer: range(config.num_experts) for layer in config.moe_layers}
        return cls(load_expert_stacks(reader, hosted, dtype, device))

    def __call__(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        stack = self.stacks[layer]
        return stack.run(hidden, routing.expert_ids.long(), routing.weights)

    def submit(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> Done:
        return Done(self(layer, hidden, routing))
