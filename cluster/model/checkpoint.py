"""Reading a sparse MoE checkpoint from safetensors, by key, memory-mapped.

A caller asks for the non-expert ("dense") weights or for a set of
(layer, expert) pairs and gets only those: an expert actor never reads another
actor's experts and the coordinator never reads an expert. Every requested key
is checked (present, right shape) before any tensor is read, so a bad
checkpoint fails whole, never half-loaded. Only safetensors are read: pickle
files (``.bin``, ``.pt``) can run code and are refused.

Key names come from the architecture's family (``families/``).

Dimensions: V vocab, D hidden, I expert hidden, Is shared expert hidden, Id dense MLP hidden,
E experts, H heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.families import family_of

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the key and the file."""


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    expert: int


@dataclass
class ExpertWeights:
    """A SwiGLU FFN's three matrices: a routed expert, the shared expert or a dense layer's MLP."""

    w1: torch.Tensor  # [I, D]  gate projection
    w3: torch.Tensor  # [I, D]  up projection
    w2: torch.Tensor  # [D, I]  down projection


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    qkv_proj: torch.Tensor  # [(H + 2*Hkv)*Dh, D]: q_proj, k_proj and v_proj stacked, one product (attention.py)
    o_proj: torch.Tensor  # [D, H*Dh]
    post_attention_norm: torch.Tensor  # [D]
    router: torch.Tensor | None  # [E, D]; None in a dense layer
    qkv_bias: torch.Tensor | None = None  # [(H + 2*Hkv)*Dh]: the three biases stacked the same way
    o_bias: torch.Tensor | None = None  # [D]
    q_norm: torch.Tensor | None = None  # [Dh] per head, or [H*Dh] over the projection
    k_norm: torch.Tensor | None = None  # [Dh] per head, or [Hkv*Dh] over the projection
    mlp: ExpertWeights | None = None  # a dense layer's MLP, [Id, D] ...
    shared_expert: ExpertWeights | None = None  # [Is, D] ...
    shared_expert_gate: torch.Tensor | None = None  # [1, D]


@dataclass
class DenseWeights:
    """Everything but the routed experts: what the coordinator holds."""

    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D] (the embedding itself when tied)


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def _ffn_shapes(keys: tuple[str, str, str], d: int, i: int) -> dict[str, tuple[int, ...]]:
    gate, up, down = keys
    return {gate: (i, d), up: (i, d), down: (d, i)}


def _layer_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of one layer's non-expert weights: attention (with the family's extras), then
    the router and shared expert of a MoE layer or the MLP of a dense one."""
    d, dh, keys = config.hidden_size, config.head_dim, family_of(config.architecture).keys
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    p = f"{_layer_prefix(layer)}.self_attn"
    shapes = {
        f"{_layer_prefix(layer)}.input_layernorm.weight": (d,),
        f"{p}.q_proj.weight": (q, d),
        f"{p}.k_proj.weight": (kv, d),
        f"{p}.v_proj.weight": (kv, d),
        f"{p}.o_proj.weight": (d, q),
        f"{_layer_prefix(layer)}.post_attention_layernorm.weight": (d,),
    }
    if config.qkv_bias:
        shapes.update({f"{p}.q_proj.bias": (q,), f"{p}.k_proj.bias": (kv,), f"{p}.v_proj.bias": (kv,)})
    if config.o_bias:
        shapes[f"{p}.o_proj.bias"] = (d,)
    if config.qk_norm != "none":
        per_head = config.qk_norm == "per_head"
        shapes.update({f"{p}.q_norm.weight": (dh if per_head else q,), f"{p}.k_norm.weight": (dh if per_head else kv,)})
    if not config.is_moe_layer(layer):
        shapes.update(_ffn_shapes(keys.dense_mlp(layer), d, config.dense_intermediate_size))
        return shapes
    shapes[keys.router(layer)] = (config.num_experts, d)
    if config.shared_expert_intermediate_size:
        shapes.update(_ffn_shapes(keys.shared_expert(layer), d, config.shared_expert_intermediate_size))
        shapes[keys.shared_expert_gate(layer)] = (1, d)
    return shapes


def dense_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of every non-expert weight."""
    d = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for layer in range(config.num_layers):
        shapes.update(_layer_shapes(config, layer))
    return shapes


def expert_weight_shapes(config: ModelConfig, key: ExpertKey) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of one expert's three matrices (gate, up, down, in that order)."""
    keys = family_of(config.architecture).keys.expert(key.layer, key.expert)
    return _ffn_shapes(keys, config.hidden_size, config.intermediate_size)


def _layer_weights(config: ModelConfig, layer: int, t: dict[str, torch.Tensor]) -> LayerWeights:
    keys, p = family_of(config.architecture).keys, f"{_layer_prefix(layer)}.self_attn"

    def ffn(names: tuple[str, str, str]) -> ExpertWeights:
        return ExpertWeights(*(t[name] for name in names))

    def stacked(kind: str) -> torch.Tensor | None:
        """q, k and v's ``kind`` (weight or bias) as one tensor, rows in that order; None without biases. The parts
        are taken out of ``t``, so each is freed once stacked."""
        parts = [t.pop(f"{p}.{name}.{kind}", None) for name in ("q_proj", "k_proj", "v_proj")]
        return None if parts[0] is None else torch.cat(parts)

    moe, shared = config.is_moe_layer(layer), _has_shared_expert(config, layer)
    return LayerWeights(
        input_norm=t[f"{_layer_prefix(layer)}.input_layernorm.weight"],
        qkv_proj=stacked("weight"),
        o_proj=t[f"{p}.o_proj.weight"],
        post_attention_norm=t[f"{_layer_prefix(layer)}.post_attention_layernorm.weight"],
        router=t[keys.router(layer)] if moe else None,
        qkv_bias=stacked("bias"),
        o_bias=t.get(f"{p}.o_proj.bias"),
        q_norm=t.get(f"{p}.q_norm.weight"),
        k_norm=t.get(f"{p}.k_norm.weight"),
        mlp=None if moe else ffn(keys.dense_mlp(layer)),
        shared_expert=ffn(keys.shared_expert(layer)) if shared else None,
        shared_expert_gate=t[keys.shared_expert_gate(layer)] if shared else None,
    )


def _has_shared_expert(config: ModelConfig, layer: int) -> bool:
    return config.is_moe_layer(layer) and bool(config.shared_expert_intermediate_size)


class CheckpointReader:
    """Key-level access to a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: str | Path, config: ModelConfig):
        self.model_dir = Path(model_dir)
        self.config = config
        self._file_of_key = _index_keys(self.model_dir)

    def keys(self) -> set[str]:
        return set(self._file_of_key)

    def read(
        self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read the given keys (validated first, all of them) as ``dtype`` on ``device``."""
        self._validate(shapes)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, keys in self._group_by_file(shapes).items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for key in keys:
                    tensors[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
        return tensors

    def _group_by_file(self, keys) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of_key[key], []).append(key)
        return by_file

    def read_dense(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> DenseWeights:
        config = self.config
        t = self.read(dense_weight_shapes(config), dtype, device)
        layers = [_layer_weights(config, layer, t) for layer in range(config.num_layers)]
        embed = t["model.embed_tokens.weight"]
        lm_head = embed if config.tie_word_embeddings else t["lm_head.weight"]
        logger.info("read dense weights of %d layers from %s", config.num_layers, self.model_dir)
        return DenseWeights(embed=embed, layers=layers, final_norm=t["model.norm.weight"], lm_head=lm_head)

    def read_experts(
        self, keys: Iterable[ExpertKey], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[ExpertKey, ExpertWeights]:
        """Read only the requested experts."""
        keys = sorted(set(keys), key=lambda k: (k.layer, k.expert))
        for key in keys:
            if not (0 <= key.layer < self.config.num_layers and 0 <= key.expert < self.config.num_experts):
                raise CheckpointError(
                    f"expert {key} out of range: the model has {self.config.num_layers} layers "
                    f"of {self.config.num_experts} experts"
                )
            if not self.config.is_moe_layer(key.layer):
                raise CheckpointError(f"expert {key}: layer {key.layer} is a dense layer, it has no experts")
        shapes: dict[str, tuple[int, ...]] = {}
        for key in keys:
            shapes.update(expert_weight_shapes(self.config, key))
        t = self.read(shapes, dtype, device)
        experts = {}
        for key in keys:
            w1, w3, w2 = (t[name] for name in expert_weight_shapes(self.config, key))
            experts[key] = ExpertWeights(w1=w1, w3=w3, w2=w2)
        logger.info("read %d experts from %s", len(experts), self.model_dir)
        return experts

    def _validate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every key present with its expected shape, checked from the headers before any tensor is read."""
        for key in shapes:
            if key not in self._file_of_key:
                raise CheckpointError(f"{self.model_dir}: missing weight {key!r} in the checkpoint")
        for file_name, keys in self._group_by_file(shapes).items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for key in keys:
                    shape = tuple(handle.get_slice(key).get_shape())
                    if shape != shapes[key]:
                        raise CheckpointError(
                            f"{self.model_dir / file_name}: weight {key!r} has shape {list(shape)}, "
                            f"expected {list(shapes[key])}"
                        )


def _index_keys(model_dir: Path) -> dict[str, str]:
    """Map every tensor key to the safetensors file (relative name) holding it."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index_path}: not a safetensors index (no 'weight_map')") from None
        for file_name in set(weight_map.values()):
            if not (model_dir / file_name).is_file():
                raise CheckpointError(f"{index_path}: lists {file_name!r}, which does not exist")
        return dict(weight_map)

    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if model_dir.is_dir() else []
        if pickles:
            raise CheckpointError(
                f"{model_dir}: found only pickle checkpoint files ({', '.join(pickles)}); moeshard loads safetensors "
                "only, since pickle can run arbitrary code. Convert it first, e.g. load it in transformers and "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise CheckpointError(f"{model_dir}: no *.safetensors files found")
    file_of_key: dict[str, str] = {}
    for file_name in files:
        with safe_open(model_dir / file_name, framework="pt") as handle:
            for key in handle.keys():
                file_of_key[key] = file_name
    return file_of_key
