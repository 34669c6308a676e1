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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from moeshard.cluster.model.checkpoint import CheckpointReader, ExpertKey, ExpertWeights
from moeshard.kernels import RouterOutput, combine, expert_ffn, permute
from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.combine import weighted_row_sum
from moeshard.kernels.expert_ffn import expert_ffn_torch, expert_rows_torch
from moeshard.kernels.expert_threads import ExpertThreads, run_tasks
from moeshard.kernels.int8_linear import Int8Weight, quantize_weight
from moeshard.kernels.linear import packable, prepack, prepacks, unpack
from moeshard.kernels.warmup import warm_up_expert_ffn


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

    def forward_pass(self) -> AbstractContextManager[None]:
        """Entered around each forward pass of the model, its MoE layers inside (remote experts change their
        placement only between passes)."""
        ...


@dataclass(frozen=True)
class Done:
    """Experts already computed (in this process)."""

    output: torch.Tensor  # [T, D]

    def wait(self) -> torch.Tensor:
        return self.output


# One matrix of every hosted expert: stacked [El, O, K], or El prepacked [O, K] (CPU, kernels/linear.py), or El
# int8 [O, K] (``quantization="experts_int8"``, kernels/int8_linear.py).
ExpertMatrices = torch.Tensor | tuple[torch.Tensor, ...] | tuple[Int8Weight, ...]


@dataclass
class ExpertStack:
    """Some experts of one layer, stacked so a grouped FFN can run over them.

    On CPU (float32, and bfloat16 where the CPU has it natively) each expert's matrices are prepacked for
    oneDNN where they are large enough (``stack_experts``): then they are tuples of [I, D] / [D, I] tensors,
    indexed per expert like the stacked tensors, and run on the torch path. Quantized experts are tuples too,
    of ``Int8Weight``."""

    expert_ids: tuple[int, ...]  # global ids of the hosted experts, in stack order
    w1: ExpertMatrices  # [El, I, D]
    w3: ExpertMatrices  # [El, I, D]
    w2: ExpertMatrices  # [El, D, I]

    @property
    def packed(self) -> bool:
        return isinstance(self.w1, tuple)

    def expert(self, index: int) -> ExpertWeights:
        """The matrices of the expert at stack ``index`` (prepacked where the stack is)."""
        return ExpertWeights(w1=self.w1[index], w3=self.w3[index], w2=self.w2[index])

    def run(
        self,
        hidden: torch.Tensor,
        local_ids: torch.Tensor,
        weights: torch.Tensor,
        sum_dtype: torch.dtype | None = None,
        threads: ExpertThreads | None = None,
    ) -> torch.Tensor:
        """hidden [T, D], local_ids [T, K] (stack index, -1 = not here), weights [T, K] -> weighted sum [T, D],
        accumulated in float32 and returned in ``sum_dtype`` (default: hidden's). An expert actor asks for
        float32: its sum is a partial one, rounded only once the coordinator has added the other actors'.
        ``threads``: on the torch path the experts are shared out over them (the same values)."""
        assert hidden.dim() == 2 and local_ids.shape == weights.shape and local_ids.shape[0] == hidden.shape[0]
        sum_dtype = sum_dtype or hidden.dtype
        if hidden.shape[0] == 1 and (self.packed or resolve_backend("auto", hidden.device) == "torch"):
            return self._run_one_token(hidden, local_ids, weights, threads).to(sum_dtype)
        perm = permute(hidden, local_ids, len(self.expert_ids))  # rows [N, D] grouped by hosted expert
        if self.packed:
            out = torch.empty_like(perm.rows)  # [N, D]
            expert_ffn_torch(perm.rows, perm.expert_offsets, self.w1, self.w3, self.w2, out, threads, perm.host_offsets)
        else:
            out = expert_ffn(
                perm.rows, perm.expert_offsets, self.w1, self.w3, self.w2, threads=threads, host_offsets=perm.host_offsets
            )  # [N, D]
        return combine(out, weights, perm, dtype=sum_dtype)  # [T, D]

    def _run_one_token(
        self, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, threads: ExpertThreads | None
    ) -> torch.Tensor:
        """``run`` for a token alone (decode at batch 1): each chosen expert on its row, nothing to group,
        summed as ``combine`` sums (float32, in j order) -> [1, D] float32. ~0.4 ms less per call than permute +
        combine on CPU."""
        chosen = [(j, e) for j, e in enumerate(local_ids[0].tolist()) if e >= 0]
        tasks = [partial(expert_rows_torch, hidden, self.w1[e], self.w3[e], self.w2[e]) for _, e in chosen]
        rows = run_tasks(tasks, threads)  # each [1, D]
        return weighted_row_sum(zip((j for j, _ in chosen), rows), weights, hidden.shape[1], hidden.device)

    def matrices(self) -> tuple[torch.Tensor, ...]:
        """The tensors holding the weights (stacks built from others may share prepacked ones)."""
        return (*self.w1, *self.w3, *self.w2) if self.packed else (self.w1, self.w3, self.w2)

    def nbytes(self) -> int:
        return held_bytes([self])


def held_bytes(stacks: Iterable[ExpertStack]) -> int:
    """The bytes of weights these stacks hold, each tensor counted once."""
    tensors = {id(w): w for stack in stacks for w in stack.matrices()}
    return sum(w.nbytes if isinstance(w, Int8Weight) else w.numel() * w.element_size() for w in tensors.values())


def stack_experts(expert_ids: tuple[int, ...], experts: list[ExpertWeights], quantization: str = "none") -> ExpertStack:
    """The experts ``expert_ids`` (their weights in that order, plain, prepacked or int8) as one stack: with
    ``quantization="experts_int8"``, int8 (quantized here unless they are already); else prepacked where
    ``prepacks`` says so for their device and dtype and every matrix is large enough to pack, else stacked
    [El, ...] (copies either way, except of matrices prepacked or quantized already, which are shared)."""
    if quantization == "experts_int8":
        matrices = {name: tuple(as_int8(getattr(x, name)) for x in experts) for name in ("w1", "w3", "w2")}
        return ExpertStack(expert_ids=expert_ids, **matrices)
    first = experts[0].w1
    every = [getattr(x, name) for x in experts for name in ("w1", "w3", "w2")]
    if prepacks(first.device, first.dtype) and all(packable(w) for w in every):
        matrices = {name: tuple(prepack(getattr(x, name)) for x in experts) for name in ("w1", "w3", "w2")}
    else:
        matrices = {name: torch.stack([unpack(getattr(x, name)) for x in experts]) for name in ("w1", "w3", "w2")}
    return ExpertStack(expert_ids=expert_ids, **matrices)


def as_int8(weight: torch.Tensor | Int8Weight) -> Int8Weight:
    return weight if isinstance(weight, Int8Weight) else quantize_weight(unpack(weight))


def load_expert_stacks(
    reader: CheckpointReader,
    hosted: dict[int, Iterable[int]],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> dict[int, ExpertStack]:
    """Read the experts hosted per layer ({layer: expert ids}) onto ``device``, one stack per layer. Quantized
    experts are read in float32 and quantized from the checkpoint's own values, whatever ``dtype`` is."""
    if quantization == "experts_int8" and torch.device(device).type != "cpu":
        raise ValueError(f"quantization 'experts_int8' runs the experts on the CPU, not on {device}: set device='cpu'")
    wanted = [ExpertKey(layer, e) for layer, experts in hosted.items() for e in experts]
    weights = reader.read_experts(wanted, torch.float32 if quantization == "experts_int8" else dtype, device)
    stacks = {}
    for layer, experts in hosted.items():
        ids = tuple(sorted(set(experts)))
        if ids:
            stacks[layer] = stack_experts(ids, [weights.pop(ExpertKey(layer, e)) for e in ids], quantization)
    return stacks


def warm_up_stacks(stacks: Iterable[ExpertStack]) -> None:
    """Compile and tune the grouped SwiGLU for each distinct shape among ``stacks`` (kernels/warmup.py); a
    no-op where it runs on torch (the CPU, prepacked stacks)."""
    seen = set()
    for stack in stacks:
        if stack.packed:
            continue
        shape = (tuple(stack.w1.shape[1:]), stack.w1.dtype, stack.w1.device)
        if shape not in seen:
            seen.add(shape)
            warm_up_expert_ffn(stack.w1, stack.w3, stack.w2)


class LocalExperts:
    """Every expert of every layer in this process: the reference experts function. With ``threads``, each
    layer's experts are shared out over them on the CPU (the same values; kernels/expert_threads.py)."""

    def __init__(self, stacks: dict[int, ExpertStack], threads: ExpertThreads | None = None):
        self.stacks = stacks
        self.threads = threads

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        threads: ExpertThreads | None = None,
        quantization: str = "none",
    ) -> "LocalExperts":
        config = reader.config
        hosted = {layer: range(config.num_experts) for layer in config.moe_layers}
        return cls(load_expert_stacks(reader, hosted, dtype, device, quantization), threads)

    def __call__(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        stack = self.stacks[layer]
        return stack.run(hidden, routing.expert_ids.long(), routing.weights, threads=self.threads)

    def submit(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> Done:
        return Done(self(layer, hidden, routing))

    def forward_pass(self) -> AbstractContextManager[None]:
        return nullcontext()
