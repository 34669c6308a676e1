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
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_half))
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        x, cos, sin, out,
        H, Dh // 2, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=block_h, BLOCK_HALF=block_half, ROUND=rounding_code(x.dtype),
        enable_fp_fusion=False,  # no fused multiply-add: each product rounded, as torch's separate ops round it
    )  # fmt: skip
    return out


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    H, HALF, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """Token t = program 0's id, BLOCK_H of its heads: both halves of each head rotated.

    x_ptr            [T, H, Dh] any float dtype (unit stride along Dh)
    cos_ptr, sin_ptr [T, Dh] x's dtype, the first half read (the second repeats it)
    out_ptr          [T, H, Dh] x's dtype
    """
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    d_ok = d < HALF
    ok = (heads[:, None] < H) & d_ok[None, :]
    c = tl.load(cos_ptr + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]  # [1, BHALF]
    s = tl.load(sin_ptr + t * stride_st + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    x1_ptrs = x_ptr + t * stride_xt + heads[:, None] * stride_xh + d[None, :]  # [BH, BHALF]
    x1 = tl.load(x1_ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    # each product and each sum rounded to x's dtype, as the reference's ops round them
    out1 = round_as(round_as(x1 * c, ROUND) - round_as(x2 * s, ROUND), ROUND)
    out2 = round_as(round_as(x2 * c, ROUND) + round_as(x1 * s, ROUND), ROUND)
    out1_ptrs = out_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out1_ptrs, out1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out1_ptrs + HALF, out2.to(out_ptr.dtype.element_ty), mask=ok)
