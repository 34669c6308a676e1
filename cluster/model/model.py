"""The sparse MoE decoder's forward pass over one step's tokens, for every family.

    embed -> for each layer:
        x += attention(rms_norm(x))                                   (KV cache)
        r  = rms_norm(x)
        MoE layer:   route(r @ W_gate.T, k)                           (router top-k)
                     x += experts(layer, r, routing)                  (dispatch -> experts -> combine)
                          + sigmoid(r @ w_sg.T) * shared_expert(r)    (Qwen2-MoE; run while the experts work)
        dense layer: x += mlp(r)                                      (Qwen's mlp_only_layers)
    -> rms_norm -> LM head

The experts are injected (``ExpertsFn``): in one process they are local, in
the cluster they live on expert actors. The model never holds routed expert
weights; the shared expert and dense MLPs are the coordinator's.

Dimensions: T tokens, D hidden, V vocab, L layers, E experts, K chosen per token, R rows whose logits are kept.
"""

from __future__ import annotations

import logging

import torch

from moeshard.cluster.model.attention import attention, step_layout
from moeshard.cluster.model.batch import StepBatch
from moeshard.cluster.model.checkpoint import DenseWeights, LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryEmbedding, rms_norm, swiglu
from moeshard.cluster.model.moe import ExpertsFn
from moeshard.kernels import route

logger = logging.getLogger(__name__)


class MoeModel:
    def __init__(self, config: ModelConfig, weights: DenseWeights, experts: ExpertsFn, cache: KVCache):
        self.config = config
        self.weights = weights
        self.experts = experts
        self.cache = cache
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.dtype = weights.embed.dtype
        # Tokens routed to each expert since start: the load that metrics (and rebalancing) read.
        self.expert_load = torch.zeros(config.num_layers, config.num_experts, dtype=torch.int64)  # [L, E]

    @torch.inference_mode()
    def forward(self, batch: StepBatch, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [R, V] of the rows ``logits_rows`` (default: each chunk's last token).

        The cache must already hold room for every chunk (``KVCache.reserve``).
        """
        config, w = self.config, self.weights
        rows = batch.last_token_rows() if logits_rows is None else logits_rows
        x = w.embed[batch.token_ids]  # [T, D]
        rotary = self.rotary.tables(batch.positions, self.dtype)
        layout = step_layout(batch, self.cache, config.sliding_window)
        for layer, lw in enumerate(w.layers):
            x = x + attention(config, lw, layer, rms_norm(x, lw.input_norm, config.rms_norm_eps), layout, rotary, self.cache)
            x = x + self.feed_forward(layer, lw, rms_norm(x, lw.post_attention_norm, config.rms_norm_eps))  # [T, D]
        x = rms_norm(x[rows], w.final_norm, config.rms_norm_eps)  # [R, D]
        return (x @ w.lm_head.T).float()  # [R, V]

    def feed_forward(self, layer: int, lw: LayerWeights, r: torch.Tensor) -> torch.Tensor:
        """r [T, D] (normed) -> the layer's FFN output [T, D]: experts (+ shared expert), or a dense MLP."""
        if lw.router is None:
            return swiglu(r, lw.mlp.w1, lw.mlp.w3, lw.mlp.w2)  # [T, D]
        config = self.config
        routing = route(r @ lw.router.T, config.experts_per_token, normalize=config.norm_topk_prob)  # [T, K] each
        self.expert_load[layer] += torch.bincount(routing.expert_ids.reshape(-1).long(), minlength=config.num_experts)
        pending = self.experts.submit(layer, r, routing)
        if lw.shared_expert is None:
            return pending.wait()  # [T, D]
        shared = swiglu(r, lw.shared_expert.w1, lw.shared_expert.w3, lw.shared_expert.w2)  # [T, D]
        shared = torch.sigmoid(r @ lw.shared_expert_gate.T) * shared  # [T, 1] * [T, D]
        return pending.wait() + shared  # [T, D]
