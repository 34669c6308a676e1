"""rotary_store: rotate a step's q and k (RoPE) and store its k and v into the paged KV cache, in one launch.

    q_out            = rotary(q)                      (kernels/rotary.py)
    key_cache[slot]  = rotary(k)                      slot = slots[t], the cache slot of token t (PagedLayout.slot_mapping)
    value_cache[slot] = v

Dimensions: T tokens, H query heads, Hkv key/value heads, Dh head dim (even), S cache slots.

The torch path is the reference, the ops the attention layer ran before: two rotations and two
``index_copy_``. On CUDA that is four launches a layer; the Triton kernel is one, a program per token, and
rounds where ``rotary_torch`` rounds, so both give the same q and the same cache bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.rotary import heads_per_tile, load_cos_sin, rotary_torch, rotate_heads
from moeshard.kernels.rounding import rounding_code


def rotary_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """q [T, H, Dh], k and v [T, Hkv, Dh], cos/sin [T, Dh] in q's dtype, slots [T] int64, key_cache and
    value_cache [S, Hkv, Dh] -> q rotated, [T, H, Dh]; k rotated and v are written into the caches' slots."""
    T, H, Dh = q.shape
    assert Dh % 2 == 0 and k.shape == v.shape == (T, k.shape[1], Dh), (q.shape, k.shape, v.shape)
    assert key_cache.shape == value_cache.shape and key_cache.shape[1:] == k.shape[1:], (key_cache.shape, k.shape)
    assert slots.shape == (T,) and slots.dtype == torch.int64, (slots.shape, slots.dtype)
    assert q.dtype == k.dtype == v.dtype == key_cache.dtype == value_cache.dtype, (q.dtype, k.dtype, key_cache.dtype)
    if resolve_backend(backend, q.device) == "triton":
        return rotary_store_triton(q, k, v, cos, sin, slots, key_cache, value_cache)
    return rotary_store_torch(q, k, v, cos, sin, slots, key_cache, value_cache)


def rotary_store_torch(q, k, v, cos, sin, slots, key_cache, value_cache) -> torch.Tensor:
    key_cache.index_copy_(0, slots, rotary_torch(k, cos, sin))  # [S, Hkv, Dh]
    value_cache.index_copy_(0, slots, v)
    return rotary_torch(q, cos, sin)


def rotary_store_triton(q, k, v, cos, sin, slots, key_cache, value_cache) -> torch.Tensor:
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    q, k, v = (z if z.stride(2) == 1 else z.contiguous() for z in (q, k, v))
    cos, sin = (z if z.stride(1) == 1 else z.contiguous() for z in (cos, sin))
    assert key_cache.stride(2) == value_cache.stride(2) == 1, "unit stride along Dh"
    q_out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    block_half = triton.next_power_of_2(Dh // 2)
    _rotary_store_kernel[(T,)](
        q, k, v, cos, sin, slots, q_out, key_cache, value_cache,
        H, Hkv, Dh // 2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), key_cache.stride(0), key_cache.stride(1),
        value_cache.stride(0), value_cache.stride(1),
        BLOCK_HQ=heads_per_tile(H, block_half), BLOCK_HKV=heads_per_tile(Hkv, block_half), BLOCK_HALF=block_half,
        ROUND=rounding_code(q.dtype),
        enable_fp_fusion=False,  # no fused multiply-add: each product rounded, as torch's separate ops round it
    )  # fmt: skip
    return q_out


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_out_ptr, kc_ptr, vc_ptr,
    H, HKV, HALF,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_ot, stride_oh, stride_kcs, stride_kch, stride_vcs, stride_vch,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """Token t = program 0's id: its q heads rotated into q_out, its k heads rotated into the key cache's slot,
    its v heads copied into the value cache's slot.

    q_ptr [T, H, Dh], k_ptr and v_ptr [T, Hkv, Dh] (unit stride along Dh); cos_ptr, sin_ptr [T, Dh], the first
    half read; slots_ptr [T] int64; q_out_ptr [T, H, Dh]; kc_ptr, vc_ptr [S, Hkv, Dh]
    """
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    c, s = load_cos_sin(cos_ptr + t * stride_ct, sin_ptr + t * stride_st, HALF, BLOCK_HALF)  # [1, BHALF] each
    rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_ot, c, s, H, HALF, stride_qh, stride_oh,
                 BLOCK_HQ, BLOCK_HALF, ROUND)  # fmt: skip
    rotate_heads(k_ptr + t * stride_kt, kc_ptr + slot * stride_kcs, c, s, HKV, HALF, stride_kh, stride_kch,
                 BLOCK_HKV, BLOCK_HALF, ROUND)  # fmt: skip
    d = tl.arange(0, BLOCK_HALF)  # [BHALF]
    d_ok = d < HALF
    for h0 in range(0, HKV, BLOCK_HKV):  # v copied as two halves, each tile as the rotations' tiles
        h = h0 + tl.arange(0, BLOCK_HKV)  # [BHKV]
        ok = (h[:, None] < HKV) & d_ok[None, :]
        src = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]  # [BHKV, BHALF]
        dst = vc_ptr + slot * stride_vcs + h[:, None] * stride_vch + d[None, :]
        tl.store(dst, tl.load(src, mask=ok), mask=ok)
        tl.store(dst + HALF, tl.load(src + HALF, mask=ok), mask=ok)
