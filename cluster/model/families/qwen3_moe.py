"""Qwen3-MoE: RMSNorm on each head's q and k (over ``head_dim``), optional dense layers, no shared expert."""

from __future__ import annotations

from typing import Any

from moeshard.cluster.model.families.base import MLP_KEYS, Family, RawConfig, qwen_dense_layers


def read_config(raw: RawConfig) -> dict[str, Any]:
    bias = bool(raw.get("attention_bias", False))
    return dict(
        intermediate_size=raw.required("moe_intermediate_size"),
        num_experts=raw.first_of("num_experts", "num_local_experts"),
        experts_per_token=raw.required("num_experts_per_tok"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qk_norm="per_head",
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", False) else None,
        dense_intermediate_size=raw.get("intermediate_size"),
        dense_layers=qwen_dense_layers(raw, raw.required("num_hidden_layers")),
    )


QWEN3_MOE = Family(architecture="Qwen3MoeForCausalLM", keys=MLP_KEYS, read_config=read_config)
