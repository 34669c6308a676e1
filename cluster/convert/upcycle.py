"""Upcycling a dense llama model into a Mixtral sparse MoE: every expert a copy of the dense FFN.

Each layer's FFN becomes E identical experts (gate -> w1, up -> w3,
down -> w2) behind a seeded random router with top-K. Routing is then real
and sparse -- the router picks K of E experts per token, and the cluster
dispatches each token to the actors that host them -- while the output is
the dense model's: with identical experts,

    y = sum_j w[j] * FFN(x) = FFN(x)      since the K weights are renormalised to sum to 1

(up to float rounding of that sum). Attention, norms and embeddings are
copied unchanged; the Mixtral config keeps the dense model's numbers.

Dimensions: D hidden, I FFN hidden, E experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moeshard.cluster.convert.gguf_reader import LlamaHyperParams, LlamaWeights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpcycleSpec:
    num_experts: int = 8
    experts_per_token: int = 2
    router_seed: int = 0

    def __post_init__(self):
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be in [1, {self.num_experts}], got {self.experts_per_token}")


def mixtral_config(hp: LlamaHyperParams, spec: UpcycleSpec, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """config.json of the upcycled model (MixtralForCausalLM)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_key_value_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_jitter_noise": 0.0,
        "torch_dtype": "float32",
    }


def router_weights(hp: LlamaHyperParams, spec: UpcycleSpec) -> list[torch.Tensor]:
    """One seeded random router per layer, [E, D] each, scaled so logits are O(|x| / sqrt(D))."""
    generator = torch.Generator().manual_seed(spec.router_seed)
    d = hp.hidden_size
    return [torch.randn(spec.num_experts, d, generator=generator) / d**0.5 for _ in range(hp.num_layers)]


def upcycled_tensors(weights: LlamaWeights, spec: UpcycleSpec) -> dict[str, torch.Tensor]:
    """The Mixtral checkpoint's tensors, key -> tensor, in file order.

    The E experts of a layer are the same three tensors under E keys (no copies):
    write them with ``write_safetensors``, which allows that.
    """
    routers = router_weights(weights.hparams, spec)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": weights.embed}
    for index, layer in enumerate(weights.layers):
        p = f"model.layers.{index}"
        tensors[f"{p}.input_layernorm.weight"] = layer.input_norm
        tensors[f"{p}.self_attn.q_proj.weight"] = layer.q_proj
        tensors[f"{p}.self_attn.k_proj.weight"] = layer.k_proj
        tensors[f"{p}.self_attn.v_proj.weight"] = layer.v_proj
        tensors[f"{p}.self_attn.o_proj.weight"] = layer.o_proj
        tensors[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_norm
        tensors[f"{p}.block_sparse_moe.gate.weight"] = routers[index]  # [E, D]
        for expert in range(spec.num_experts):
            q = f"{p}.block_sparse_moe.experts.{expert}"
            tensors[f"{q}.w1.weight"] = layer.gate_proj  # [I, D]
            tensors[f"{q}.w3.weight"] = layer.up_proj  # [I, D]
            tensors[f"{q}.w2.weight"] = layer.down_proj  # [D, I]
    tensors["model.norm.weight"] = weights.final_norm
    if weights.lm_head is not None:
        tensors["lm_head.weight"] = weights.lm_head
    logger.info(
        "upcycled %d layers to %d experts each (top-%d, router seed %d)",
        len(weights.layers), spec.num_experts, spec.experts_per_token, spec.router_seed,
    )
    return tensors
