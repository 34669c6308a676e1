"""Grouped-query causal self-attention over a step's sequences, with the paged KV cache.

The q/k/v projections carry what the families add: biases (Qwen2-MoE), RMSNorm
of q and k per head over Dh (Qwen3-MoE) or over the whole projection (OLMoE),
clipping of q, k and v (OLMoE's ``clip_qkv``), all before RoPE.

Dimensions: T tokens in the step, D hidden, H heads, Hkv kv heads, Dh head dim,
n one chunk's new tokens, S the chunk's sequence length so far.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moeshard.cluster.model.batch import StepBatch
from moeshard.cluster.model.checkpoint import LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryTables, apply_rotary, rms_norm


class QKV(NamedTuple):
    q: torch.Tensor  # [T, H, Dh]
    k: torch.Tensor  # [T, Hkv, Dh]
    v: torch.Tensor  # [T, Hkv, Dh]


def project_qkv(config: ModelConfig, weights: LayerWeights, x: torch.Tensor) -> QKV:
    """x [T, D] (normed) -> q, k, v split into heads, before RoPE."""
    t, dh, eps = x.shape[0], config.head_dim, config.rms_norm_eps
    q = _linear(x, weights.q_proj, weights.q_bias)  # [T, H*Dh]
    k = _linear(x, weights.k_proj, weights.k_bias)  # [T, Hkv*Dh]
    v = _linear(x, weights.v_proj, weights.v_bias)  # [T, Hkv*Dh]
    if config.qk_norm == "whole":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    if config.clip_qkv is not None:
        q, k, v = (z.clamp(-config.clip_qkv, config.clip_qkv) for z in (q, k, v))
    q, k, v = q.view(t, -1, dh), k.view(t, -1, dh), v.view(t, -1, dh)  # [T, H|Hkv, Dh]
    if config.qk_norm == "per_head":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    return QKV(q, k, v)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def attention(
    config: ModelConfig,
    weights: LayerWeights,
    layer: int,
    x: torch.Tensor,
    batch: StepBatch,
    rotary: RotaryTables,
    cache: KVCache,
) -> torch.Tensor:
    """x [T, D] (already normed) -> attention output [T, D]; writes this step's K/V into the cache."""
    t = x.shape[0]
    h, hkv, dh = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = project_qkv(config, weights, x)
    q, k, v = apply_rotary(qkv.q, rotary), apply_rotary(qkv.k, rotary), qkv.v  # [T, H|Hkv, Dh]

    out = torch.empty_like(q)  # [T, H, Dh]
    row = 0
    for chunk in batch.chunks:
        rows = slice(row, row + chunk.num_tokens)
        row += chunk.num_tokens
        new_slots = cache.slots(chunk.seq_id, chunk.start_pos, chunk.end_pos)  # [n]
        cache.keys[layer, new_slots] = k[rows]
        cache.values[layer, new_slots] = v[rows]
        all_slots = cache.slots(chunk.seq_id, 0, chunk.end_pos)  # [S]
        keys = cache.keys[layer, all_slots].transpose(0, 1)  # [Hkv, S, Dh]
        values = cache.values[layer, all_slots].transpose(0, 1)  # [Hkv, S, Dh]
        mask = _causal_mask(chunk.start_pos, chunk.num_tokens, config.sliding_window)  # [n, S] or None
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=hkv != h
        )  # [H, n, Dh]
        out[rows] = attended.transpose(0, 1)
    return _linear(out.reshape(t, h * dh), weights.o_proj, weights.o_bias)  # [T, D]


def _causal_mask(start_pos: int, num_new: int, sliding_window: int | None) -> torch.Tensor | None:
    """Boolean [n, S] mask (True = may attend): key j visible to query p iff j <= p (and p - j < window)."""
    length = start_pos + num_new
    if num_new == 1 and (sliding_window is None or length <= sliding_window):
        return None
    query_pos = torch.arange(start_pos, length)[:, None]  # [n, 1]
    key_pos = torch.arange(length)[None, :]  # [1, S]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= query_pos - key_pos < sliding_window
    return mask
