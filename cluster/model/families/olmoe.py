"""OLMoE: RMSNorm over the whole q and k projections (before the heads split), optional q/k/v clipping."""

from __future__ import annotations

from typing import Any

from moeshard.cluster.model.families.base import MLP_KEYS, Family, RawConfig


def read_config(raw: RawConfig) -> dict[str, Any]:
    bias = bool(raw.get("attention_bias", False))
    return dict(
        intermediate_size=raw.required("intermediate_size"),
        num_experts=raw.first_of("num_experts", "num_local_experts"),
        experts_per_token=raw.required("num_experts_per_tok"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        qk_norm="whole",
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=raw.get("clip_qkv"),
    )


OLMOE = Family(architecture="OlmoeForCausalLM", keys=MLP_KEYS, read_config=read_config)
