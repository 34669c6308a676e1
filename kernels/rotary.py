"""rotary: rotary position embedding (RoPE, the half-split layout of Hugging Face Llama/Mixtral) of q or k.

    out = x * cos + rotate_half(x) * sin        rotate_half(x) = cat(-x2, x1), x = cat(x1, x2) along Dh

Dimensions: T tokens, H heads, Dh head dim (even), Dh/2 = half.

cos and sin are per token, [T, Dh], in x's dtype, each the same half twice (``RotaryEmbedding.tables``).
The torch reference writes each half without materialising rotate_half(x) and rounds each product and the
sum to x's dtype, as transformers' expression does (x1 * cos - x2 * sin equals x1 * cos + (-x2) * sin
exactly). It takes six ops; the Triton kernel is one launch and rounds at the same points, so the two are
equal bit for bit.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.rounding import round_as, rounding_code

logger = logging.getLogger(__name__)

MAX_TILE = 4096  # elements of one half-head tile a program holds at once


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x [T, H, Dh], cos/sin [T, Dh] in x's dtype -> [T, H, Dh] rotated by each token's position."""
    assert x.dim() == 3 and x.shape[-1] % 2 == 0, x.shape
    assert cos.shape == sin.shape == (x.shape[0], x.shape[-1]), (x.shape, cos.shape, sin.shape)
    assert cos.dtype == sin.dtype == x.dtype and cos.device == sin.device == x.device, (x.dtype, cos.dtype, sin.dtype)
    if resolve_backend(backend, x.device) == "triton":
        return rotary_triton(x, cos, sin)
    return rotary_torch(x, cos, sin)


def rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference, per half: out1 = x1 * cos - x2 * sin, out2 = x2 * cos + x1 * sin (each op rounded)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # [T, 1, Dh/2]
    x1, x2 = x[..., :half], x[..., half:]  # [T, H, Dh/2]
    out = torch.empty_like(x)
    torch.mul(x1, c, out=out[..., :half]).sub_(x2 * s)
    torch.mul(x2, c, out=out[..., half:]).add_(x1 * s)
    return out


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, H, Dh = x.shape
    x = x if x.stride(2) == 1 else x.contiguous()
    cos, sin = (z if z.stride(1) == 1 else z.contiguous() for z in (cos, sin))
    out = torch.empty(T, H, Dh, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_half = triton.next_power_of_2(Dh // 2)
    _rotary_kernel[(T,)](
        x, cos, sin, out,
        H, Dh // 2, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=heads_per_tile(H, block_half), BLOCK_HALF=block_half, ROUND=rounding_code(x.dtype),
        enable_fp_fusion=False,  # no fused multiply-add: each product rounded, as torch's separate ops round it
    )  # fmt: skip
    return out


def heads_per_tile(heads: int, block_half: int) -> int:
    """Heads a program rotates at once: all of them, up to ``MAX_TILE`` elements of a half."""
    return max(1, min(triton.next_power_of_2(heads), MAX_TILE // block_half))


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    H, HALF, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """Token t = program 0's id: both halves of each of its heads rotated.

    x_ptr            [T, H, Dh] any float dtype (unit stride along Dh)
    cos_ptr, sin_ptr [T, Dh] x's dtype, the first half read (the second repeats it)
    out_ptr          [T, H, Dh] x's dtype
    """
    t = tl.program_id(0).to(tl.int64)
    c, s = load_cos_sin(cos_ptr + t * stride_ct, sin_ptr + t * stride_st, HALF, BLOCK_HALF)
    rotate_heads(x_ptr + t * stride_xt, out_ptr + t * stride_ot, c, s, H, HALF, stride_xh, stride_oh, BLOCK_H, BLOCK_HALF, ROUND)


@triton.jit
def load_cos_sin(cos_ptr, sin_ptr, HALF, BLOCK_HALF: tl.constexpr):
    """One token's cos and sin, the first half of each, as [1, BHALF] float32."""
    d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    c = tl.load(cos_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    return c, s


@triton.jit
def rotate_heads(
    src, dst, c, s, heads, HALF, stride_src_h, stride_dst_h,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """One token's ``heads`` heads at ``src`` (unit stride along Dh) rotated into ``dst``, ``BLOCK_H`` at a time;
    c, s [1, BHALF] float32 from ``load_cos_sin``."""
    d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    for h0 in range(0, heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)  # [BH]
        ok = (h[:, None] < heads) & (d[None, :] < HALF)
        x1_ptrs = src + h[:, None] * stride_src_h + d[None, :]  # [BH, BHALF]
        x1 = tl.load(x1_ptrs, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
        # each product and each sum rounded to the dtype, as the reference's ops round them
        out1 = round_as(round_as(x1 * c, ROUND) - round_as(x2 * s, ROUND), ROUND)
        out2 = round_as(round_as(x2 * c, ROUND) + round_as(x1 * s, ROUND), ROUND)
        out1_ptrs = dst + h[:, None] * stride_dst_h + d[None, :]
        tl.store(out1_ptrs, out1.to(dst.dtype.element_ty), mask=ok)
        tl.store(out1_ptrs + HALF, out2.to(dst.dtype.element_ty), mask=ok)
