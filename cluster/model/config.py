"""Model configuration, read once from a Hugging Face ``config.json`` and validated.

Every later stage takes a ``ModelConfig``; nothing else reads ``config.json``.
The architecture's family (``families/``) says which fields it reads and how.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeshard.cluster.errors import first_field_error
from moeshard.cluster.model.families import (
    SUPPORTED_ARCHITECTURES,
    ConfigError,
    RawConfig,
    family_of,
    unsupported_message,
)

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "ConfigError", "ModelConfig"]


class ModelConfig(BaseModel):
    """The architecture numbers of a sparse MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # one routed expert's hidden size
    num_experts: int = Field(gt=0)
    experts_per_token: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(gt=0)
    sliding_window: int | None = Field(default=None, gt=0)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # What the families change.
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum to 1
    qk_norm: Literal["none", "per_head", "whole"] = "none"  # RMSNorm of q and k: over Dh, or over the projection
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = Field(default=None, gt=0)
    shared_expert_intermediate_size: int | None = Field(default=None, gt=0)  # a shared expert with a sigmoid gate
    dense_intermediate_size: int | None = Field(default=None, gt=0)  # the MLP of dense layers
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(unsupported_message(self.architecture))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.experts_per_token}) exceeds num_local_experts ({self.num_experts})"
            )
        if any(not 0 <= layer < self.num_layers for layer in self.dense_layers):
            raise ValueError(f"dense layers {list(self.dense_layers)} out of range for {self.num_layers} layers")
        if self.dense_layers and self.dense_intermediate_size is None:
            raise ValueError("dense layers need intermediate_size (the dense MLP's hidden size)")
        return self

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers whose feed-forward is the experts."""
        return tuple(layer for layer in range(self.num_layers) if layer not in self.dense_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Map a Hugging Face config dict onto ``ModelConfig``; errors are one line naming the field."""
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ConfigError(f"{source}: missing field 'architectures'")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: {unsupported_message(architecture)}")
        family = family_of(architecture)
        fields = RawConfig(raw, source, architecture)
        try:
            return cls(**{**fields.common(), **family.read_config(fields)})
        except ValidationError as exc:
            error = first_field_error(exc)
            raise ConfigError(f"{source}: invalid {error.field or 'config'}: {error.message}") from None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_hf_dict(raw, source=str(path))
