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

Ping-pong: with remote experts, a step of at least ``ping_pong_min_sequences``
sequences runs as two micro-batches (whole sequences, about half the tokens
each), interleaved layer by layer so that one's attention runs on the
coordinator while the other's experts run on the actors (MegaScale-Infer's
ping-pong pipeline). Each token's math is unchanged.

Dimensions: T tokens, D hidden, V vocab, L layers, E experts, K chosen per token, R rows whose logits are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeshard.cluster.model.attention import attention, step_layout
from moeshard.cluster.model.batch import StepBatch
from moeshard.cluster.model.checkpoint import DenseWeights, LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryEmbedding, rms_norm, swiglu
from moeshard.cluster.model.moe import Done, ExpertsFn, PendingExperts
from moeshard.kernels import route
from moeshard.kernels.batch_invariance import batch_invariant
from moeshard.kernels.host_copy import from_host
from moeshard.kernels.linear import linear, linear_on_threads

# Sees each step's routing once, after its forward pass: (the step's batch, expert ids [L_moe, T, K] of every MoE
# layer in order, first choice first).
RoutingObserver = Callable[[StepBatch, torch.Tensor], None]

logger = logging.getLogger(__name__)


class MoeModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: DenseWeights,
        experts: ExpertsFn,
        cache: KVCache,
        ping_pong_min_sequences: int | None = None,
        batch_invariant: bool = False,
        lm_head_threads: int = 1,
    ):
        self.config = config
        # Torch threads of the LM head's product (EngineConfig.lm_head_threads); more than the process's own borrows
        # cores that wait meanwhile (those of the expert actors or expert threads: the experts have replied).
        self.lm_head_threads = lm_head_threads
        # Every forward pass batch invariant (kernels/batch_invariance.py): a request's numbers do not depend
        # on the other requests of its steps, its prefill chunks or the prefix cache.
        self.batch_invariant = batch_invariant
        # Steps of at least this many sequences run as two micro-batches (None: never; for remote experts).
        self.ping_pong_min_sequences = ping_pong_min_sequences
        self.weights = weights
        self.experts = experts
        self.cache = cache
        self.dtype = weights.embed.dtype
        self.routing_observer: RoutingObserver | None = None  # routing analysis (cluster/analysis/); None costs nothing
        self.device = weights.embed.device
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, self.device)
        # Tokens routed to each expert since start, counted on the device without a host sync.
        self._load = torch.zeros(config.num_layers, config.num_experts, dtype=torch.int64, device=self.device)  # [L, E]
        # Each MoE layer's first entry in the flattened counters, to count a whole pass's choices at once.
        moe_layers = torch.tensor(config.moe_layers, dtype=torch.int64, device=self.device)  # [L_moe]
        self._load_rows = (moe_layers * config.num_experts)[:, None, None]  # [L_moe, 1, 1]

    @property
    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since start [L, E], on the CPU: the load that metrics (and rebalancing) read."""
        return self._load.cpu()

    @torch.inference_mode()
    def forward(self, batch: StepBatch, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits [R, V] of the rows ``logits_rows`` (default: each chunk's last token).

        The cache must already hold room for every chunk (``KVCache.reserve``).
        """
        config, w = self.config, self.weights
        rows = from_host(batch.last_token_rows() if logits_rows is None else logits_rows, self.device)
        batch = batch.to(self.device)
        parts = batch.split_in_two() if len(batch.chunks) >= max(2, self.ping_pong_min_sequences or 2**62) else (batch,)
        # Each micro-batch: its tokens' hidden states [t, D] and its pending FFN (None before the first layer).
        xs = [w.embed.index_select(0, part.token_ids) for part in parts]  # [t, D] each
        rotaries = [self.rotary.tables(part.positions, self.dtype) for part in parts]
        # each micro-batch its own decode mirror; batch-invariant attention reads every query's keys on its own
        mirrors = () if self.batch_invariant else self.cache.decode_mirrors
        layouts = [
            step_layout(part, self.cache, config.sliding_window, mirrors[i] if i < len(mirrors) else None)
            for i, part in enumerate(parts)
        ]
        pending: list[PendingFeedForward | None] = [None] * len(parts)
        routed: list[list[torch.Tensor]] = [[] for _ in parts]  # per micro-batch, each MoE layer's expert ids [t, K]
        with batch_invariant(self.batch_invariant):
            with self.experts.forward_pass():
                for layer, lw in enumerate(w.layers):
                    for i, part in enumerate(parts):  # micro-batch i's attention runs while the other's experts work
                        if pending[i] is not None:
                            xs[i] = pending[i].finish()  # [t, D]
                        normed = rms_norm(xs[i], lw.input_norm, config.rms_norm_eps)
                        h = xs[i] + attention(config, lw, layer, normed, layouts[i], rotaries[i], self.cache)
                        pending[i] = self.start_feed_forward(layer, lw, h, routed[i])
                x = torch.cat([p.finish() for p in pending]) if len(parts) > 1 else pending[0].finish()  # [T, D]
            if config.moe_layers:
                stacked = [torch.stack(ids) for ids in routed]  # [L_moe, t, K] per micro-batch
                chosen = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)  # [L_moe, T, K]
                keys = (chosen.long() + self._load_rows).reshape(-1)  # [L_moe*T*K] (layer, expert) in the counters
                self._load.view(-1).index_add_(0, keys, torch.ones_like(keys))  # a few ops a pass, not three a layer
                if self.routing_observer is not None:
                    self.routing_observer(batch, chosen)
            x = rms_norm(x[rows], w.final_norm, config.rms_norm_eps)  # [R, D]
            return linear_on_threads(x, w.lm_head, self.lm_head_threads).float()  # [R, V]

    def start_feed_forward(self, layer: int, lw: LayerWeights, h: torch.Tensor, routed: list[torch.Tensor]) -> "PendingFeedForward":
        """h [T, D] (the residual stream after attention) -> its FFN started: experts submitted (+ shared expert run).
        An MoE layer appends its expert ids [T, K] to ``routed`` (the pass counts them and shows them to a routing
        observer once its layers are done)."""
        config = self.config
        r = rms_norm(h, lw.post_attention_norm, config.rms_norm_eps)  # [T, D]
        if lw.router is None:
            return PendingFeedForward(h, Done(swiglu(r, lw.mlp.w1, lw.mlp.w3, lw.mlp.w2)), None)
        routing = route(linear(r, lw.router), config.experts_per_token, normalize=config.norm_topk_prob)  # [T, K] each
        routed.append(routing.expert_ids)  # [T, K]
        experts = self.experts.submit(layer, r, routing)
        if lw.shared_expert is None:
            return PendingFeedForward(h, experts, None)
        shared = swiglu(r, lw.shared_expert.w1, lw.shared_expert.w3, lw.shared_expert.w2)  # [T, D], while the experts work
        return PendingFeedForward(h, experts, torch.sigmoid(linear(r, lw.shared_expert_gate)) * shared)  # [T, 1] * [T, D]


@dataclass
class PendingFeedForward:
    """A layer's FFN under way for some tokens: ``finish`` waits for the experts and adds it to the residual."""

    residual: torch.Tensor  # [T, D] the stream after attention
    experts: PendingExperts  # the routed experts (or a dense MLP's output)
    shared: torch.Tensor | None  # [T, D] the gated shared expert, already computed

    def finish(self) -> torch.Tensor:
        out = self.residual + self.experts.wait()  # [T, D]
        return out if self.shared is None else out + self.shared
