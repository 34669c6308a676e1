"""A small random-weight Mixtral checkpoint for trying moeshard without downloading anything.

It is a real Mixtral-format directory (config.json, model.safetensors) with
the real Mixtral SentencePiece tokenizer from mistral-common's wheel, so every
code path runs; its weights are random, so its text is noise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

DEMO_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "sliding_window": None,
    "torch_dtype": "float32",
}


def mistral_tokenizer_file() -> Path:
    """tokenizer.model.v1 inside the installed mistral-common wheel, found without importing the package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model needs the Mixtral tokenizer from the 'mistral-common' package: pip install 'moeshard[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but has no {path.name}")
    return path


def _random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    tensors = {"model.embed_tokens.weight": matrix(v, d), "model.norm.weight": torch.ones(d), "lm_head.weight": matrix(v, d)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(d)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(d)
        tensors[f"{p}.self_attn.q_proj.weight"] = matrix(q_out, d)
        tensors[f"{p}.self_attn.k_proj.weight"] = matrix(kv_out, d)
        tensors[f"{p}.self_attn.v_proj.weight"] = matrix(kv_out, d)
        tensors[f"{p}.self_attn.o_proj.weight"] = matrix(d, q_out)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = matrix(config["num_local_experts"], d)
        for e in range(config["num_local_experts"]):
            tensors[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = matrix(i, d)
            tensors[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = matrix(i, d)
            tensors[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = matrix(d, i)
    return tensors


def write_demo_model(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write the demo checkpoint to ``out_dir``; an existing complete one is kept unless ``force``."""
    out = Path(out_dir)
    if not force and all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.model")):
        logger.info("demo model already at %s", out)
        return out
    tokenizer = mistral_tokenizer_file()
    out.mkdir(parents=True, exist_ok=True)
    save_file(_random_weights(DEMO_CONFIG, seed), out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tokenizer, out / "tokenizer.model")
    (out / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    logger.info("wrote demo model to %s", out)
    return out
