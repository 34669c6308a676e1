"""Engine assembly, written once for every caller (offline ``LLM``, the offline coordinator actor, the Serve replica).

    read_model_files(model_dir)            -> ModelFiles (config.json + tokenizer)
    build_engine(config, files, experts)   -> Engine (dense weights, KV cache, model, scheduler)

``experts=None`` reads the experts into this process: the single-process reference.
The cluster passes the experts function that dispatches to expert actors instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.engine import Engine
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.device import resolve_device, resolve_dtype
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.model import MoeModel
from moeshard.cluster.model.moe import ExpertsFn, LocalExperts, warm_up_stacks
from moeshard.cluster.model.prepack import prepack_dense
from moeshard.cluster.text.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from moeshard.kernels.expert_threads import ExpertThreads
from moeshard.kernels.linear import prepacks
from moeshard.kernels.warmup import uses_triton, warm_up_paged_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory says about itself, besides its weights."""

    model_dir: str
    model_config: ModelConfig
    tokenizer: Tokenizer | None  # None: token-id prompts only


def maybe_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The model's tokenizer, or None for a directory without one (token-id prompts only)."""
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer; only token-id prompts will work", model_dir)
        return None
    return load_tokenizer(model_dir)


def read_model_files(model_dir: str | Path) -> ModelFiles:
    return ModelFiles(str(model_dir), ModelConfig.from_model_dir(model_dir), maybe_tokenizer(model_dir))


def build_engine(config: EngineConfig, files: ModelFiles, experts: ExpertsFn | None = None) -> Engine:
    """A ready engine for ``config``; its experts are ``experts``, or read into this process when None."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    logger.info("the model runs on %s in %s", device, str(dtype).removeprefix("torch."))
    mc = files.model_config
    reader = CheckpointReader(config.model_dir, mc)
    dense = reader.read_dense(dtype, device)
    if prepacks(device, dtype):
        dense = prepack_dense(dense)
    # Local experts have nothing to overlap; a compiled graph runs one execution at a time here.
    overlaps = experts is not None and config.cluster.transport in ("actor_calls", "socket", "collective")
    ping_pong = (config.ping_pong_min_sequences or None) if overlaps else None
    if experts is None:
        experts = LocalExperts.from_checkpoint(
            reader, dtype, device, expert_threads(config.expert_threads, device), config.quantization
        )
    cache = KVCache.with_budget(
        mc.num_layers, mc.num_kv_heads, mc.head_dim, config.kv_cache_bytes, config.kv_block_size, dtype,
        config.enable_prefix_caching, device, config.decode_mirror_bytes, config.decode_mirror_min_keys,
    )  # fmt: skip
    if uses_triton(device):
        warm_up_paged_attention(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, config.kv_block_size, mc.sliding_window,
            config.max_batch_tokens, dtype, device,
        )  # fmt: skip
        if isinstance(experts, LocalExperts):
            warm_up_stacks(experts.stacks.values())
    eos = frozenset(mc.eos_token_ids) or (files.tokenizer.eos_token_ids if files.tokenizer else frozenset())
    if config.batch_invariant and (device.type != "cpu" or mc.sliding_window is not None):
        where = f"on {device}" if device.type != "cpu" else f"with a sliding window ({mc.sliding_window})"
        raise ValueError(f"batch_invariant runs on the CPU, for models without a sliding window: not {where}")
    head_threads = lm_head_threads(config.lm_head_threads, device)
    model = MoeModel(mc, dense, experts, cache, ping_pong, config.batch_invariant, head_threads)
    return Engine(model, eos, config.max_batch_tokens, config.max_running, token_limit(mc, files.tokenizer))


def expert_threads(count: int, device: torch.device) -> ExpertThreads | None:
    """Threads for the in-process experts (``EngineConfig.expert_threads``); None for 1, or off the CPU. Each
    runs its products on one torch thread, so torch's intra-op threads are set to 1 for the process."""
    if count == 1:
        return None
    if device.type != "cpu":
        logger.info("expert_threads=%d applies to experts on the CPU; the model runs on %s", count, device)
        return None
    torch.set_num_threads(1)
    logger.info("the experts run on %d threads; torch's intra-op threads set to 1", count)
    return ExpertThreads(count)


def lm_head_threads(setting: int | None, device: torch.device) -> int:
    """The torch threads of the LM head's product (``EngineConfig.lm_head_threads``): None, every CPU this process
    may run on; 1 off the CPU (the setting is for CPU products)."""
    if device.type != "cpu":
        return 1
    if setting is not None:
        return setting
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def token_limit(model_config: ModelConfig, tokenizer: Tokenizer | None) -> int:
    """The bound on token ids: the model's vocabulary and the tokenizer's, the smaller wins.

    A model's embedding is often padded past its tokenizer (ids the tokenizer cannot decode):
    those ids are refused in prompts and never sampled. A tokenizer larger than the model could
    produce ids the model cannot embed: its text prompts then fail with a 400 naming the id.
    """
    limit = model_config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size != limit:
        logger.warning(
            "the tokenizer has %d tokens and the model %d: token ids stay below %d",
            tokenizer.vocab_size, limit, min(limit, tokenizer.vocab_size),
        )
        limit = min(limit, tokenizer.vocab_size)
    return limit
