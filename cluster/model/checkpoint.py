"""Reading a Mixtral checkpoint from safetensors, by key, memory-mapped.

A caller asks for the non-expert ("dense") weights or for a set of
(layer, expert) pairs and gets only those: an expert actor never reads another
actor's experts and the coordinator never reads an expert. Every requested key
is checked (present, right shape) before any tensor is read, so a bad
checkpoint fails whole, never half-loaded. Only safetensors are read: pickle
files (``.bin``, ``.pt``) can run code and are refused.

Dimensions: V vocab, D hidden, I expert hidden, E experts, H heads, Hkv kv heads, Dh head dim.
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
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    q_proj: torch.Tensor  # [H*Dh, D]
    k_proj: torch.Tensor  # [Hkv*Dh, D]
    v_proj: torch.Tensor  # [Hkv*Dh, D]
    o_proj: torch.Tensor  # [D, H*Dh]
    post_attention_norm: torch.Tensor  # [D]
    router: torch.Tensor  # [E, D]


@dataclass
class DenseWeights:
    """Everything but the experts: what the coordinator holds."""

    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D] (the embedding itself when tied)


@dataclass
class ExpertWeights:
    w1: torch.Tensor  # [I, D]  gate projection
    w3: torch.Tensor  # [I, D]  up projection
    w2: torch.Tensor  # [D, I]  down projection


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def dense_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of every non-expert weight."""
    d, dh = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for layer in range(config.num_layers):
        p = _layer_prefix(layer)
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (config.num_heads * dh, d)
        shapes[f"{p}.self_attn.k_proj.weight"] = (config.num_kv_heads * dh, d)
        shapes[f"{p}.self_attn.v_proj.weight"] = (config.num_kv_heads * dh, d)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, config.num_heads * dh)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        shapes[f"{p}.block_sparse_moe.gate.weight"] = (config.num_experts, d)
    return shapes


def expert_weight_shapes(config: ModelConfig, key: ExpertKey) -> dict[str, tuple[int, ...]]:
    """Key -> expected shape of one expert's three matrices."""
    d, i = config.hidden_size, config.intermediate_size
    p = f"{_layer_prefix(key.layer)}.block_sparse_moe.experts.{key.expert}"
    return {f"{p}.w1.weight": (i, d), f"{p}.w3.weight": (i, d), f"{p}.w2.weight": (d, i)}


class CheckpointReader:
    """Key-level access to a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: str | Path, config: ModelConfig):
        self.model_dir = Path(model_dir)
        self.config = config
        self._file_of_key = _index_keys(self.model_dir)

    def keys(self) -> set[str]:
        return set(self._file_of_key)

    def read(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read the given keys (validated first, all of them) as ``dtype``."""
        self._validate(shapes)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, keys in self._group_by_file(shapes).items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for key in keys:
                    tensors[key] = handle.get_tensor(key).to(dtype)
        return tensors

    def _group_by_file(self, keys) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of_key[key], []).append(key)
        return by_file

    def read_dense(self, dtype: torch.dtype) -> DenseWeights:
        config = self.config
        t = self.read(dense_weight_shapes(config), dtype)
        layers = []
        for layer in range(config.num_layers):
            p = _layer_prefix(layer)
            layers.append(
                LayerWeights(
                    input_norm=t[f"{p}.input_layernorm.weight"],
                    q_proj=t[f"{p}.self_attn.q_proj.weight"],
                    k_proj=t[f"{p}.self_attn.k_proj.weight"],
                    v_proj=t[f"{p}.self_attn.v_proj.weight"],
                    o_proj=t[f"{p}.self_attn.o_proj.weight"],
                    post_attention_norm=t[f"{p}.post_attention_layernorm.weight"],
                    router=t[f"{p}.block_sparse_moe.gate.weight"],
                )
            )
        embed = t["model.embed_tokens.weight"]
        lm_head = embed if config.tie_word_embeddings else t["lm_head.weight"]
        logger.info("read dense weights of %d layers from %s", config.num_layers, self.model_dir)
        return DenseWeights(embed=embed, layers=layers, final_norm=t["model.norm.weight"], lm_head=lm_head)

    def read_experts(self, keys: Iterable[ExpertKey], dtype: torch.dtype) -> dict[ExpertKey, ExpertWeights]:
        """Read only the requested experts."""
        keys = sorted(set(keys), key=lambda k: (k.layer, k.expert))
        for key in keys:
            if not (0 <= key.layer < self.config.num_layers and 0 <= key.expert < self.config.num_experts):
                raise CheckpointError(
                    f"expert {key} out of range: the model has {self.config.num_layers} layers "
                    f"of {self.config.num_experts} experts"
                )
        shapes: dict[str, tuple[int, ...]] = {}
        for key in keys:
            shapes.update(expert_weight_shapes(self.config, key))
        t = self.read(shapes, dtype)
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
