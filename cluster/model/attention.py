"""Grouped-query causal self-attention over a step's sequences, with the paged KV cache.

    project q, k, v (one product on their stacked weights) -> RoPE of q and k, and the step's k, v written
    into the cache (kernels/rotary_store.py: one launch per layer on the Triton path)
    -> paged_attention over the cache (kernels/: every sequence of the step in one call) -> o_proj

The q/k/v projections carry what the families add: biases (Qwen2-MoE), RMSNorm
of q and k per head over Dh (Qwen3-MoE) or over the whole projection (OLMoE),
clipping of q, k and v (OLMoE's ``clip_qkv``), all before RoPE.

Dimensions: T tokens in the step, D hidden, H heads, Hkv kv heads, Dh head dim, S cache slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeshard.cluster.model.batch import StepBatch
from moeshard.cluster.model.checkpoint import LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryTables, rms_norm
from moeshard.kernels import PagedLayout, paged_attention, rotary_store
from moeshard.kernels.decode_mirror import DecodeMirror
from moeshard.kernels.linear import linear


class QKV(NamedTuple):
    q: torch.Tensor  # [T, H, Dh]
    k: torch.Tensor  # [T, Hkv, Dh]
    v: torch.Tensor  # [T, Hkv, Dh]


def project_qkv(config: ModelConfig, weights: LayerWeights, x: torch.Tensor) -> QKV:
    """x [T, D] (normed) -> q, k, v split into heads, before RoPE."""
    t, dh, eps = x.shape[0], config.head_dim, config.rms_norm_eps
    q_width, kv_width = config.num_heads * dh, config.num_kv_heads * dh
    qkv = linear(x, weights.qkv_proj, weights.qkv_bias)  # [T, (H + 2*Hkv)*Dh]
    q, k, v = qkv.split((q_width, kv_width, kv_width), dim=1)  # [T, H*Dh], [T, Hkv*Dh] x 2 (views)
    if config.qk_norm == "whole":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    if config.clip_qkv is not None:
        q, k, v = (z.clamp(-config.clip_qkv, config.clip_qkv) for z in (q, k, v))
    q, k, v = q.view(t, -1, dh), k.view(t, -1, dh), v.view(t, -1, dh)  # [T, H|Hkv, Dh]
    if config.qk_norm == "per_head":
        q, k = rms_norm(q, weights.q_norm, eps), rms_norm(k, weights.k_norm, eps)
    return QKV(q, k, v)


def step_layout(
    batch: StepBatch, cache: KVCache, sliding_window: int | None, decode_mirror: DecodeMirror | None = None
) -> PagedLayout:
    """The step's sequences as paged attention reads them; built once per step, shared by every layer. With
    ``decode_mirror`` (one of the cache's), the torch path's decode group reads its keys from it."""
    return PagedLayout(
        query_lens=tuple(c.num_tokens for c in batch.chunks),
        start_pos=tuple(c.start_pos for c in batch.chunks),
        block_tables=tuple(tuple(cache.block_table(c.seq_id)) for c in batch.chunks),
        block_size=cache.block_size,
        sliding_window=sliding_window,
        device=cache.keys.device,
        decode_mirror=decode_mirror,
        seq_ids=tuple(c.seq_id for c in batch.chunks),
    )


def attention(
    config: ModelConfig,
    weights: LayerWeights,
    layer: int,
    x: torch.Tensor,
    layout: PagedLayout,
    rotary: RotaryTables,
    cache: KVCache,
) -> torch.Tensor:
    """x [T, D] (already normed) -> attention output [T, D]; writes this step's K/V into the cache first."""
    t = x.shape[0]
    qkv = project_qkv(config, weights, x)
    # q rotated [T, H, Dh]; k rotated and v written into the cache's [S, Hkv, Dh] at the step's slots
    q = rotary_store(qkv.q, qkv.k, qkv.v, rotary.cos, rotary.sin, layout.slot_mapping, cache.keys[layer], cache.values[layer])
    out = paged_attention(q, cache.keys[layer], cache.values[layer], layout, layer=layer)  # [T, H, Dh]
    return linear(out.reshape(t, config.num_heads * config.head_dim), weights.o_proj, weights.o_bias)  # [T, D]
