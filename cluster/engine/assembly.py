"""Assemble a ready engine from a model directory: dense weights, KV cache, model, and an experts function."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.engine.engine import Engine
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.model import MixtralModel
from moeshard.cluster.model.moe import ExpertsFn
from moeshard.cluster.text.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def maybe_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The model's tokenizer, or None for a directory without one (token-id prompts only)."""
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer; only token-id prompts will work", model_dir)
        return None
    return load_tokenizer(model_dir)


def build_engine(
    config: EngineConfig,
    model_config: ModelConfig,
    tokenizer: Tokenizer | None,
    make_experts: Callable[[CheckpointReader, torch.dtype], ExpertsFn],
) -> Engine:
    dtype = torch_dtype(config.dtype)
    reader = CheckpointReader(config.model_dir, model_config)
    dense = reader.read_dense(dtype)
    experts = make_experts(reader, dtype)
    mc = model_config
    cache = KVCache.with_budget(mc.num_layers, mc.num_kv_heads, mc.head_dim, config.kv_cache_bytes, config.kv_block_size, dtype)
    eos = frozenset(mc.eos_token_ids) or (tokenizer.eos_token_ids if tokenizer else frozenset())
    return Engine(MixtralModel(mc, dense, experts, cache), eos, config.max_batch_tokens)
