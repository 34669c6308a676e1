"""Grouped-query causal self-attention over a step's sequences, with the paged KV cache.

Dimensions: T tokens in the step, D hidden, H heads, Hkv kv heads, Dh head dim,
n one chunk's new tokens, S the chunk's sequence length so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeshard.cluster.model.batch import StepBatch
from moeshard.cluster.model.checkpoint import LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryTables, apply_rotary


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
    q = apply_rotary((x @ weights.q_proj.T).view(t, h, dh), rotary)  # [T, H, Dh]
    k = apply_rotary((x @ weights.k_proj.T).view(t, hkv, dh), rotary)  # [T, Hkv, Dh]
    v = (x @ weights.v_proj.T).view(t, hkv, dh)  # [T, Hkv, Dh]

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
    return out.reshape(t, h * dh) @ weights.o_proj.T  # [T, D]


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
