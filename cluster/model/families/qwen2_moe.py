"""Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, optional dense layers, optional top-k renormalisation."""

from __future__ import annotations

from typing import Any

from moeshard.cluster.model.families.base import MLP_KEYS, Family, RawConfig, qwen_dense_layers


def read_config(raw: RawConfig) -> dict[str, Any]:
    if raw.get("use_sliding_window", False):
        raise raw.error("use_sliding_window: per-layer sliding-window attention of Qwen2-MoE is not supported")
    return dict(
        intermediate_size=raw.required("moe_intermediate_size"),
        num_experts=raw.first_of("num_experts", "num_local_experts"),
        experts_per_token=raw.required("num_experts_per_tok"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qkv_bias=bool(raw.get("qkv_bias", True)),
        shared_expert_intermediate_size=raw.required("shared_expert_intermediate_size"),
        dense_intermediate_size=raw.required("intermediate_size"),
        dense_layers=qwen_dense_layers(raw, raw.required("num_hidden_layers")),
    )


QWEN2_MOE = Family(architecture="Qwen2MoeForCausalLM", keys=MLP_KEYS, read_config=read_config)
