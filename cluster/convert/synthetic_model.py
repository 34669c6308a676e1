"""Random-weight Mixtral checkpoints of any size, for benchmarks (no tokenizer; prompts are token ids)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_synthetic_mixtral(
    out_dir: str | Path,
    *,
    hidden_size: int = 1024,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_experts: int = 8,
    experts_per_token: int = 2,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write config.json and model.safetensors with weights scaled so activations stay O(1)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden_size // num_heads
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) / cols**0.5).to(dtype)

    d, i = hidden_size, intermediate_size
    tensors = {
        "model.embed_tokens.weight": matrix(vocab_size, d),
        "model.norm.weight": torch.ones(d, dtype=dtype),
        "lm_head.weight": matrix(vocab_size, d),
    }
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(d, dtype=dtype)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(d, dtype=dtype)
        tensors[f"{p}.self_attn.q_proj.weight"] = matrix(num_heads * head_dim, d)
        tensors[f"{p}.self_attn.k_proj.weight"] = matrix(num_kv_heads * head_dim, d)
        tensors[f"{p}.self_attn.v_proj.weight"] = matrix(num_kv_heads * head_dim, d)
        tensors[f"{p}.self_attn.o_proj.weight"] = matrix(d, num_heads * head_dim)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = matrix(num_experts, d)
        for e in range(num_experts):
            tensors[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = matrix(i, d)
            tensors[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = matrix(i, d)
            tensors[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = matrix(d, i)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab_size,
        "hidden_size": d,
        "intermediate_size": i,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "num_local_experts": num_experts,
        "num_experts_per_tok": experts_per_token,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
