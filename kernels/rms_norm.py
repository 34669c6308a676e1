"""rms_norm: RMSNorm over the last dim, as the decoder's norms compute it.

    y = weight * round(x / sqrt(mean(x^2) + eps))      x widened to float32; round: to x's dtype

Dimensions: R rows (every leading dim of x flattened), D the normalised dim.

The torch reference is transformers' Llama/Mixtral RMSNorm: the mean of squares and the scaling in float32,
the normalised row rounded to x's dtype, then multiplied by the weight in the weights' and x's common dtype.
It takes eight small ops; the Triton kernel is one launch (a decode step of an 8-layer model runs 17 norms,
so about 120 launches fewer a step on a GPU). The kernel rounds where the reference does, so the two differ
only by the mean's summation order (float32 ulps of the variance).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, tile_rows
from moeshard.kernels.rounding import round_as, rounding_code

logger = logging.getLogger(__name__)

MAX_BLOCK_D = 4096  # a wider row is read in chunks of this many (twice: the mean, then the scaling)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x's and weight's common dtype."""
    assert x.is_floating_point() and x.dim() >= 1 and weight.shape == (x.shape[-1],), (x.shape, weight.shape)
    assert weight.device == x.device, (x.device, weight.device)
    if resolve_backend(backend, x.device) == "triton":
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: normalised in float32, rounded to x's dtype, scaled in the common dtype."""
    wide = x.float()  # one cast, read twice
    variance = wide.pow(2).mean(-1, keepdim=True)  # [..., 1]
    normed = wide * torch.rsqrt(variance + eps)
    return weight * normed.to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    rows = x.reshape(-1, D)  # [R, D] (a copy only where x's leading dims cannot be flattened as a view)
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # [R, D]
    R = rows.shape[0]
    if R == 0 or D == 0:
        return out.view(x.shape)
    block_d = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    block_r = tile_rows(block_d, R)
    _rms_norm_kernel[(triton.cdiv(R, block_r),)](
        rows, weight, out,
        R, D, rows.stride(0), weight.stride(0), out.stride(0), eps,
        BLOCK_R=block_r, BLOCK_D=block_d, ROUND_X=rounding_code(x.dtype), ROUND_OUT=rounding_code(out.dtype),
    )  # fmt: skip
    return out.view(x.shape)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,
    R, D, stride_xr, stride_w, stride_or, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_X: tl.constexpr, ROUND_OUT: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program, read in chunks of BLOCK_D: the sum of squares, then the scaled rows.

    x_ptr   [R, D] any float dtype (unit stride along D)
    w_ptr   [D]
    out_ptr [R, D] x's and w's common dtype (unit stride along D)
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    cols = tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < R
    squares = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (cols[None, :] < D - d0)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + d0 + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        squares += x * x
    inv = tl.math.rsqrt(tl.sum(squares, axis=1) / D + eps)  # [BR] the rsqrt torch's CUDA kernels use
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (cols[None, :] < D - d0)
        x = tl.load(x_ptr + rows[:, None] * stride_xr + d0 + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (d0 + cols) * stride_w, mask=cols < D - d0, other=0.0).to(tl.float32)  # [BD]
        normed = round_as(x * inv[:, None], ROUND_X)  # rounded to x's dtype, as the reference does
        y = round_as(w[None, :] * normed, ROUND_OUT)
        tl.store(out_ptr + rows[:, None] * stride_or + d0 + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
