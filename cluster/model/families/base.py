"""What a model family changes: its checkpoint key names and how its config.json maps onto ``ModelConfig``.

A family is plain data plus one function. The shared fields (sizes, heads,
RoPE, norms, token ids) are read here once; a family's ``read_config`` adds what
is its own (expert count and size, routing rule, attention extras, shared
expert, dense layers). Nothing here imports torch or the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FFN_NAMES = ("gate_proj", "up_proj", "down_proj")  # SwiGLU matrices: Qwen and OLMoE experts, every dense MLP


class ConfigError(ValueError):
    """A model directory whose config.json cannot be served; the message is one line."""


@dataclass(frozen=True)
class CheckpointKeys:
    """Where a family's MoE weights sit in its safetensors keys (under ``model.layers.{L}.``)."""

    moe: str  # the MoE block: "block_sparse_moe" (Mixtral) or "mlp"
    expert_names: tuple[str, str, str]  # gate, up, down projection names of one expert

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe}.gate.weight"

    def expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Keys of one expert's gate [I, D], up [I, D] and down [D, I] matrices."""
        prefix = f"model.layers.{layer}.{self.moe}.experts.{expert}"
        return tuple(f"{prefix}.{name}.weight" for name in self.expert_names)  # type: ignore[return-value]

    @staticmethod
    def dense_mlp(layer: int) -> tuple[str, str, str]:
        """A dense layer's MLP (Qwen's ``mlp_only_layers``)."""
        return tuple(f"model.layers.{layer}.mlp.{name}.weight" for name in FFN_NAMES)  # type: ignore[return-value]

    @staticmethod
    def shared_expert(layer: int) -> tuple[str, str, str]:
        return tuple(f"model.layers.{layer}.mlp.shared_expert.{name}.weight" for name in FFN_NAMES)  # type: ignore[return-value]

    @staticmethod
    def shared_expert_gate(layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


MIXTRAL_KEYS = CheckpointKeys(moe="block_sparse_moe", expert_names=("w1", "w3", "w2"))
MLP_KEYS = CheckpointKeys(moe="mlp", expert_names=FFN_NAMES)


class RawConfig:
    """A config.json dict with one-line errors naming the missing field."""

    def __init__(self, raw: dict[str, Any], source: str, architecture: str):
        self.raw, self.source, self.architecture = raw, source, architecture

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name)
        return default if value is None else value

    def required(self, name: str) -> Any:
        if self.raw.get(name) is None:
            raise ConfigError(f"{self.source}: missing field {name!r} (required for {self.architecture})")
        return self.raw[name]

    def first_of(self, *names: str) -> Any:
        """The first of several spellings of one field (transformers renamed some between versions)."""
        for name in names:
            if self.raw.get(name) is not None:
                return self.raw[name]
        return self.required(names[0])

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def common(self) -> dict[str, Any]:
        return common_fields(self)


def common_fields(raw: "RawConfig") -> dict[str, Any]:
    """The fields every family reads the same way."""
    hidden_size = raw.required("hidden_size")
    num_heads = raw.required("num_attention_heads")
    eos = raw.get("eos_token_id")
    return dict(
        architecture=raw.architecture,
        vocab_size=raw.required("vocab_size"),
        hidden_size=hidden_size,
        num_layers=raw.required("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads", num_heads),
        head_dim=raw.get("head_dim") or (hidden_size // num_heads),
        rms_norm_eps=raw.required("rms_norm_eps"),
        rope_theta=rope_theta(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.required("max_position_embeddings"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def rope_theta(raw: RawConfig) -> float:
    """RoPE base: ``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise raw.error(f"unsupported rope type {rope_type!r}; only 'default' RoPE is supported")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise raw.error("missing field 'rope_theta' (or 'rope_parameters.rope_theta')")
    return float(theta)


def qwen_dense_layers(raw: RawConfig, num_layers: int) -> tuple[int, ...]:
    """Layers with a dense MLP instead of experts: ``mlp_only_layers``, else every layer off ``decoder_sparse_step``."""
    mlp_only = set(raw.get("mlp_only_layers", []))
    step = raw.get("decoder_sparse_step", 1)
    return tuple(layer for layer in range(num_layers) if layer in mlp_only or (layer + 1) % step != 0)


@dataclass(frozen=True)
class Family:
    """One architecture (``config.json``'s ``architectures[0]``) and what it changes."""

    architecture: str
    keys: CheckpointKeys
    read_config: Callable[[RawConfig], dict[str, Any]]  # family fields of ModelConfig, on top of common_fields
