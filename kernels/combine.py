"""combine: the weighted un-permute that ends an MoE layer.

    out[t] = sum_j weights[t, j] * expert_out[slot[t, j]]     over the j with slot[t, j] >= 0

Dimensions: T tokens, D hidden, K chosen per token, N rows.

Accumulated in float32 in j order and cast to the output's dtype (expert_out's
unless told otherwise: an expert actor keeps its partial sums in float32, so that
the coordinator rounds a bfloat16 token once, as the single process does); a token
with no row sent gets zeros. Each output row is owned by one program that loops
over j: no atomics, so the result is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, tile_rows
from moeshard.kernels.permute import Permutation

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 64  # torch path: tokens per step, [64, D] float32 fits in cache


def combine(
    expert_out: torch.Tensor,
    weights: torch.Tensor,
    perm: Permutation,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """expert_out [N, D] (rows in perm's order), weights [T, K] -> out [T, D] in ``dtype`` (default: expert_out's;
    ``out``'s when given)."""
    assert expert_out.dim() == 2 and weights.dim() == 2 and weights.is_floating_point(), (
        expert_out.shape,
        weights.shape,
    )
    assert weights.shape == perm.slot.shape, (weights.shape, perm.slot.shape)
    assert expert_out.shape[0] == perm.source_token.shape[0], (expert_out.shape, perm.source_token.shape)
    T, D = weights.shape[0], expert_out.shape[1]
    if out is None:
        out = torch.empty(T, D, dtype=dtype or expert_out.dtype, device=expert_out.device)
    assert out.shape == (T, D) and out.is_floating_point() and dtype in (None, out.dtype), (out.shape, out.dtype, dtype)
    if resolve_backend(backend, expert_out.device) == "triton":
        combine_triton(expert_out, weights, perm.slot, out)
    else:
        combine_torch(expert_out, weights, perm.slot, out)
    return out


def combine_torch(expert_out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
    """Chunks of CHUNK_TOKENS tokens, so the float32 accumulator stays in cache; only float32
    tensors meet in the arithmetic (mixed-dtype elementwise ops take torch's slow path on CPU)."""
    T, K = slot.shape
    D = expert_out.shape[1]
    if expert_out.shape[0] == 0 or T == 0:
        out.zero_()
        return
    if T == 1:  # a token alone (decode at batch 1): its K rows added in j order, without the chunk machinery
        _combine_one_token(expert_out, weights, slot, out)
        return
    sent = slot >= 0  # [T, K]
    some_unsent = not bool(sent.all())
    w = torch.where(sent, weights.float(), 0.0)  # [T, K]
    index = slot.clamp(min=0)  # [T, K]
    n = min(T, CHUNK_TOKENS)
    acc = torch.empty(n, D, dtype=torch.float32, device=out.device)  # [n, D]
    rows = torch.empty(n, D, dtype=expert_out.dtype, device=out.device)  # [n, D]
    rows32 = rows if rows.dtype == torch.float32 else torch.empty_like(acc)
    for t0 in range(0, T, n):
        t1 = min(t0 + n, T)
        a, r, r32 = acc[: t1 - t0], rows[: t1 - t0], rows32[: t1 - t0]
        for j in range(K):
            torch.index_select(expert_out, 0, index[t0:t1, j], out=r)
            if some_unsent:
                r.masked_fill_(~sent[t0:t1, j, None], 0)  # never let an unsent choice's row (inf/nan) through
            if r32 is not r:
                r32.copy_(r)
            if j == 0:
                torch.mul(r32, w[t0:t1, j, None], out=a)
            else:
                a.addcmul_(r32, w[t0:t1, j, None])
        out[t0:t1].copy_(a)


def _combine_one_token(expert_out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
    """``combine_torch`` for T = 1: the same float32 sum in j order (an unsent choice adds nothing)."""
    chosen = ((j, expert_out[row : row + 1]) for j, row in enumerate(slot[0].tolist()) if row >= 0)
    out.copy_(weighted_row_sum(chosen, weights, expert_out.shape[1], out.device))


def weighted_row_sum(
    chosen: Iterable[tuple[int, torch.Tensor]], weights: torch.Tensor, width: int, device: torch.device
) -> torch.Tensor:
    """One token's combine: sum of weights[0, j] * row over ``chosen`` (j, row [1, D]) pairs, in the order given
    (increasing j), accumulated in float32 -> [1, D] float32. The one definition of a lone token's summation order,
    which the cluster's bit-equality with the single process depends on: ``combine`` and ``ExpertStack.run`` use it."""
    w = weights.float()  # [1, K]
    acc = torch.zeros(1, width, dtype=torch.float32, device=device)  # [1, D]
    for j, row in chosen:
        acc.addcmul_(row.float(), w[:, j : j + 1])
    return acc


def combine_triton(expert_out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor, out: torch.Tensor) -> None:
    T, K = slot.shape
    D = out.shape[1]
    if T == 0 or D == 0:
        return
    expert_out = expert_out if expert_out.stride(1) == 1 else expert_out.contiguous()
    assert out.stride(1) == 1, "out must have unit stride along D"
    block_d = min(256, triton.next_power_of_2(D))
    block_t = tile_rows(block_d, T)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](
        expert_out, weights, slot, out,
        T, D, K,
        expert_out.stride(0), weights.stride(0), weights.stride(1), slot.stride(0), slot.stride(1), out.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip


@triton.jit
def _combine_kernel(
    x_ptr, w_ptr, slot_ptr, out_ptr,
    T, D, K,
    stride_x, stride_wt, stride_wk, stride_st, stride_sk, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program owns a [BLOCK_T, BLOCK_D] tile of the output and loops over the K choices.

    x_ptr    [N, D] expert outputs, any float dtype (unit stride along D)
    w_ptr    [T, K] routing weights, any float dtype
    slot_ptr [T, K] int64 row of x for (t, j), -1 = not sent
    out_ptr  [T, D] any float dtype (unit stride along D)
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < T
    col_ok = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        s = tl.load(slot_ptr + rows * stride_st + j * stride_sk, mask=row_ok, other=-1).to(tl.int64)  # [BT]
        sent = s >= 0
        w = tl.load(w_ptr + rows * stride_wt + j * stride_wk, mask=row_ok & sent, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + s[:, None] * stride_x + cols[None, :], mask=sent[:, None] & col_ok[None, :], other=0.0)
        acc += w[:, None] * x.to(tl.float32)  # [BT, BD]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
