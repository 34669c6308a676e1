"""Model configuration, read once from a Hugging Face ``config.json`` and validated.

Every later stage takes a ``ModelConfig``; nothing else reads ``config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeshard.cluster.errors import first_field_error

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)


class ConfigError(ValueError):
    """A model directory whose config.json cannot be served; the message is one line."""


class ModelConfig(BaseModel):
    """The architecture numbers of a Mixtral-style sparse MoE decoder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    experts_per_token: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = Field(gt=0)
    sliding_window: int | None = Field(default=None, gt=0)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.experts_per_token}) exceeds num_local_experts ({self.num_experts})"
            )
        return self

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Map a Hugging Face config dict onto ``ModelConfig``; errors are one line naming the field."""
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ConfigError(f"{source}: missing field 'architectures'")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def required(name: str) -> Any:
            if raw.get(name) is None:
                raise ConfigError(f"{source}: missing field {name!r} (required for {architecture})")
            return raw[name]

        hidden_size = required("hidden_size")
        num_heads = required("num_attention_heads")
        head_dim = raw.get("head_dim") or (hidden_size // num_heads)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                architecture=architecture,
                vocab_size=required("vocab_size"),
                hidden_size=hidden_size,
                num_layers=required("num_hidden_layers"),
                num_heads=num_heads,
                num_kv_heads=raw.get("num_key_value_heads") or num_heads,
                head_dim=head_dim,
                intermediate_size=required("intermediate_size"),
                num_experts=required("num_local_experts"),
                experts_per_token=required("num_experts_per_tok"),
                rms_norm_eps=required("rms_norm_eps"),
                rope_theta=_rope_theta(raw, source),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                max_position_embeddings=required("max_position_embeddings"),
                sliding_window=raw.get("sliding_window"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
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


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    """RoPE base: ``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: unsupported rope type {rope_type!r}; only 'default' RoPE is supported")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{source}: missing field 'rope_theta' (or 'rope_parameters.rope_theta')")
    return float(theta)
