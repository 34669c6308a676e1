"""Mixtral: every layer sparse, top-k renormalised, no biases, no q/k norms, no shared expert."""

from __future__ import annotations

from typing import Any

from moeshard.cluster.model.families.base import MIXTRAL_KEYS, Family, RawConfig


def read_config(raw: RawConfig) -> dict[str, Any]:
    return dict(
        intermediate_size=raw.required("intermediate_size"),
        num_experts=raw.required("num_local_experts"),
        experts_per_token=raw.required("num_experts_per_tok"),
        norm_topk_prob=True,
        sliding_window=raw.get("sliding_window"),
    )


MIXTRAL = Family(architecture="MixtralForCausalLM", keys=MIXTRAL_KEYS, read_config=read_config)
