"""expert_ffn: grouped SwiGLU over rows already grouped by expert.

    rows of expert e = rows[off[e]:off[e + 1]]
    out = W2_e @ (silu(W1_e @ x) * (W3_e @ x))       for each row x of expert e

Dimensions: N rows, D hidden, I expert hidden, E experts, B row blocks.

Experts with no rows cost nothing. The torch reference loops over the experts
that have rows, or shares them out over CPU threads (``expert_threads.py``).
The Triton version is a grouped GEMM in two kernels, gate/up fused (->
activated intermediate [N, I] in rows' dtype) then down, over a table of
(expert, first row) blocks of BLOCK_M rows, one program each. The table is
built on the host from the offsets as Python ints, which the permutation's one
host sync already brought back (``Permutation.host_offsets``), and copied to
the device at once: a dozen small device ops a layer fewer than building it
there. Accumulation is float32.

Triton's interpreter has no bfloat16 arithmetic (its ``tl.dot`` multiplies the
raw bit patterns: triton-lang/triton#11584), so under the interpreter the
operands are cast to float32 before ``tl.dot`` (DOT_FP32). bf16 x bf16 products
are exact in float32, so this is the same sum as the GPU's bf16 ``tl.dot``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, triton_interprets
from moeshard.kernels.expert_threads import ExpertThreads, run_tasks
from moeshard.kernels.host_copy import from_host
from moeshard.kernels.int8_linear import Int8Weight, int8_expert_rows
from moeshard.kernels.linear import linear, linear_into
from moeshard.kernels.tuning import (
    AUTOTUNED_LAUNCH,
    GEMM_CONFIGS,
    KEEP_TIMINGS,
    autotune_bench,
    dot_precision,
    gemm_block_m,
    gemm_pruner,
)

logger = logging.getLogger(__name__)


def expert_ffn(
    rows: torch.Tensor,
    expert_offsets: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    threads: ExpertThreads | None = None,
    host_offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """rows [N, D] grouped by expert, expert_offsets [E + 1], w1/w3 [E, I, D], w2 [E, D, I] -> [N, D].
    ``threads``: the torch path shares the experts out over them (kernels/expert_threads.py).
    ``host_offsets``: expert_offsets as Python ints where the caller has them (``Permutation.host_offsets``);
    both backends read the segments on the host, so without them the offsets are copied there (a host sync
    off the CPU)."""
    assert rows.dim() == 2 and w1.dim() == 3, (rows.shape, w1.shape)
    N, D = rows.shape
    E, I = w1.shape[0], w1.shape[1]
    assert w1.shape == (E, I, D) and w3.shape == (E, I, D) and w2.shape == (E, D, I), (w1.shape, w3.shape, w2.shape)
    assert expert_offsets.shape == (E + 1,) and not expert_offsets.is_floating_point(), expert_offsets.shape
    assert rows.dtype == w1.dtype == w3.dtype == w2.dtype, (rows.dtype, w1.dtype, w3.dtype, w2.dtype)
    if out is None:
        out = torch.empty(N, D, dtype=rows.dtype, device=rows.device)
    assert out.shape == (N, D) and out.dtype == rows.dtype, (out.shape, out.dtype)
    if resolve_backend(backend, rows.device) == "triton":
        expert_ffn_triton(rows, expert_offsets, w1, w3, w2, out, host_offsets)
    else:
        expert_ffn_torch(rows, expert_offsets, w1, w3, w2, out, threads, host_offsets)
    return out


def expert_ffn_torch(
    rows, expert_offsets, w1, w3, w2, out, threads: ExpertThreads | None = None, host_offsets: Sequence[int] | None = None
) -> None:
    """``expert_ffn`` on torch: each expert with rows through ``expert_rows_torch`` into its own rows of ``out``,
    shared out over ``threads`` when given (the same values either way)."""
    offsets = expert_offsets.tolist() if host_offsets is None else host_offsets
    assert len(offsets) == expert_offsets.shape[0], (len(offsets), expert_offsets.shape)
    assert offsets[0] == 0 and offsets[-1] == rows.shape[0], (offsets[0], offsets[-1], rows.shape)
    segments = [(e, start, end) for e, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])) if end > start]
    run_tasks([partial(expert_rows_torch, rows[s:t], w1[e], w3[e], w2[e], out[s:t]) for e, s, t in segments], threads)


def expert_rows_torch(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [n, D] through one expert (w1/w3 [I, D], w2 [D, I]) -> [n, D], into ``out`` when given."""
    if isinstance(w1, Int8Weight):
        return int8_expert_rows(x, w1, w3, w2, out)
    h = F.silu(linear(x, w1), inplace=True).mul_(linear(x, w3))  # [n, I]; in place: no more [n, I] buffers
    if out is None:
        return linear(h, w2)  # [n, D]
    return linear_into(h, w2, out)  # [n, D]


def expert_blocks(host_offsets: Sequence[int], block_m: int, device: torch.device) -> torch.Tensor:
    """[B, 2] int64 (expert, first row) of each block of block_m rows of each expert's segment, one kernel
    program each: built on the host from the offsets and copied to ``device`` at once (one device op, no wait)."""
    table = [
        (e, first)
        for e, (start, end) in enumerate(zip(host_offsets[:-1], host_offsets[1:]))
        for first in range(start, end, block_m)
    ]
    return from_host(torch.tensor(table, dtype=torch.int64).reshape(-1, 2), device)  # [B, 2]


def expert_ffn_triton(rows, expert_offsets, w1, w3, w2, out, host_offsets: Sequence[int] | None = None) -> None:
    N, D = rows.shape
    E, I = w1.shape[0], w1.shape[1]
    if N == 0 or D == 0:
        return
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    assert out.stride(1) == 1, "out must have unit stride along D"
    offsets = expert_offsets.long().contiguous()
    host_offsets = expert_offsets.tolist() if host_offsets is None else host_offsets
    assert len(host_offsets) == E + 1 and host_offsets[0] == 0 and host_offsets[-1] == N, (host_offsets, N)
    block_m = gemm_block_m(N, E)
    blocks = expert_blocks(host_offsets, block_m, rows.device)  # [B, 2]
    B = blocks.shape[0]
    h = torch.empty(N, I, dtype=rows.dtype, device=rows.device)  # [N, I] activated intermediate
    precision = dot_precision(rows.dtype)
    with AUTOTUNED_LAUNCH:
        _gate_up_kernel[lambda meta: (B, triton.cdiv(I, meta["BLOCK_N"]))](
            rows, w1, w3, h, offsets, blocks,
            D, I,
            rows.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), w3.stride(0), w3.stride(1), w3.stride(2), h.stride(0),
            BLOCK_M=block_m, DOT_FP32=triton_interprets(), PRECISION=precision,
        )  # fmt: skip
        _down_kernel[lambda meta: (B, triton.cdiv(D, meta["BLOCK_N"]))](
            h, w2, out, offsets, blocks,
            D, I,
            h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
            BLOCK_M=block_m, DOT_FP32=triton_interprets(), PRECISION=precision,
        )  # fmt: skip


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["D", "I", "BLOCK_M", "PRECISION"],
    prune_configs_by={"early_config_prune": gemm_pruner("I", "D", "x_ptr", weight_operands=2)},
    cache_results=KEEP_TIMINGS,
    do_bench=autotune_bench,
)
@triton.jit
def _gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, offsets_ptr, blocks_ptr,
    D, I,
    stride_xn, stride_1e, stride_1i, stride_1d, stride_3e, stride_3i, stride_3d, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """h[m, n] = silu(x[m] . w1[e, n]) * (x[m] . w3[e, n]) for a [BLOCK_M, BLOCK_N] tile of block b's rows.

    x_ptr            [N, D] rows grouped by expert (unit stride along D)
    w1_ptr, w3_ptr   [E, I, D] x's dtype
    h_ptr            [N, I] x's dtype out (unit stride along I)
    offsets_ptr      [E + 1] int64 expert segment offsets
    blocks_ptr       [B, 2] int64 (expert, first row) of each row block
    """
    e = tl.load(blocks_ptr + 2 * tl.program_id(0))
    m = tl.load(blocks_ptr + 2 * tl.program_id(0) + 1) + tl.arange(0, BLOCK_M)  # [BM] rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of I
    k = tl.arange(0, BLOCK_K)  # [BK] columns of D
    m_ok = m < tl.load(offsets_ptr + e + 1)
    n_ok = n < I
    x_ptrs = x_ptr + m[:, None] * stride_xn + k[None, :]  # [BM, BK]
    w1_ptrs = w1_ptr + e * stride_1e + n[None, :] * stride_1i + k[:, None] * stride_1d  # [BK, BN]
    w3_ptrs = w3_ptr + e * stride_3e + n[None, :] * stride_3i + k[:, None] * stride_3d  # [BK, BN]
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = k < D - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w1 = tl.load(w1_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w3 = tl.load(w3_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            x, w1, w3 = x.to(tl.float32), w1.to(tl.float32), w3.to(tl.float32)
        acc1 = tl.dot(x, w1, acc1, input_precision=PRECISION)  # [BM, BN]
        acc3 = tl.dot(x, w3, acc3, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K * stride_1d
        w3_ptrs += BLOCK_K * stride_3d
    h = acc1 * tl.sigmoid(acc1) * acc3  # [BM, BN]
    h_out = h_ptr + m[:, None] * stride_hn + n[None, :]
    tl.store(h_out, h.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["D", "I", "BLOCK_M", "PRECISION"],
    prune_configs_by={"early_config_prune": gemm_pruner("D", "I", "h_ptr", weight_operands=1)},
    cache_results=KEEP_TIMINGS,
    do_bench=autotune_bench,
)
@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, out_ptr, offsets_ptr, blocks_ptr,
    D, I,
    stride_hn, stride_2e, stride_2d, stride_2i, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out[m, n] = h[m] . w2[e, n] for a [BLOCK_M, BLOCK_N] tile of block b's rows.

    h_ptr            [N, I] activated intermediate (unit stride along I)
    w2_ptr           [E, D, I] h's dtype
    out_ptr          [N, D] h's dtype out (unit stride along D)
    offsets_ptr      [E + 1] int64 expert segment offsets
    blocks_ptr       [B, 2] int64 (expert, first row) of each row block
    """
    e = tl.load(blocks_ptr + 2 * tl.program_id(0))
    m = tl.load(blocks_ptr + 2 * tl.program_id(0) + 1) + tl.arange(0, BLOCK_M)  # [BM] rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of D
    k = tl.arange(0, BLOCK_K)  # [BK] columns of I
    m_ok = m < tl.load(offsets_ptr + e + 1)
    n_ok = n < D
    h_ptrs = h_ptr + m[:, None] * stride_hn + k[None, :]  # [BM, BK]
    w2_ptrs = w2_ptr + e * stride_2e + n[None, :] * stride_2d + k[:, None] * stride_2i  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = k < I - k0
        h = tl.load(h_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w2 = tl.load(w2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            h, w2 = h.to(tl.float32), w2.to(tl.float32)
        acc = tl.dot(h, w2, acc, input_precision=PRECISION)  # [BM, BN]
        h_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K * stride_2i
    out = out_ptr + m[:, None] * stride_on + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
