"""Reading a llama-architecture GGUF file (llama.cpp's format): metadata and dequantised weights.

GGUF writes a tensor's dims fastest-first (``[in, out]`` for a linear layer);
the ``gguf`` package's reader already hands the data over row-major
(``[out, in]``, torch's orientation), and ``gguf.quants.dequantize`` keeps it.
llama.cpp's converter also permutes the rows of ``attn_q`` / ``attn_k`` per
head, from Hugging Face's rotate-half RoPE layout (the first half of a head's
dims pairs with the second) to GPT-J's interleaved one; ``unpermute_rope_rows``
undoes it, exactly as transformers' GGUF loader does.

Tensor names, GGUF -> Hugging Face llama:

    token_embd            model.embed_tokens        output        lm_head (absent when tied)
    output_norm           model.norm
    blk.{L}.attn_norm     input_layernorm           blk.{L}.ffn_norm   post_attention_layernorm
    blk.{L}.attn_q|k|v    self_attn.q|k|v_proj      blk.{L}.attn_output  self_attn.o_proj
    blk.{L}.ffn_gate|up|down  mlp.gate|up|down_proj

Dimensions: V vocab, D hidden, I FFN hidden, H heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ARCHITECTURE = "llama"


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a llama model; the message is one line."""


@dataclass(frozen=True)
class LlamaHyperParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor  # [D]
    q_proj: torch.Tensor  # [H*Dh, D]  rotate-half layout (un-permuted)
    k_proj: torch.Tensor  # [Hkv*Dh, D]  rotate-half layout (un-permuted)
    v_proj: torch.Tensor  # [Hkv*Dh, D]
    o_proj: torch.Tensor  # [D, H*Dh]
    post_attention_norm: torch.Tensor  # [D]
    gate_proj: torch.Tensor  # [I, D]
    up_proj: torch.Tensor  # [I, D]
    down_proj: torch.Tensor  # [D, I]


@dataclass
class LlamaWeights:
    """A dense llama model's weights in Hugging Face orientation, float32."""

    hparams: LlamaHyperParams
    embed: torch.Tensor  # [V, D]
    layers: list[LlamaLayer]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor | None  # [V, D]; None when tied to the embedding


class GGUFFile:
    """Metadata fields and dequantised tensors of one GGUF file, by name."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}

    def has_field(self, key: str) -> bool:
        return key in self._reader.fields

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (int, float, bool, str, or a list of them); ``default`` when absent."""
        entry = self._reader.fields.get(key)
        return default if entry is None else entry.contents()

    def required_field(self, key: str) -> Any:
        if not self.has_field(key):
            raise GGUFError(f"{self.path}: missing metadata field {key!r}")
        return self.field(key)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        """The named tensor dequantised to float32, row-major ([out, in] for a linear layer)."""
        from gguf.quants import dequantize

        entry = self._tensors.get(name)
        if entry is None:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        values = dequantize(entry.data, entry.tensor_type)
        return torch.from_numpy(np.array(values, dtype=np.float32))


def read_llama_hparams(gguf: GGUFFile) -> LlamaHyperParams:
    """The architecture numbers from ``llama.*`` metadata."""
    architecture = gguf.required_field("general.architecture")
    if architecture != ARCHITECTURE:
        raise GGUFError(f"{gguf.path}: architecture {architecture!r} is not supported; expected {ARCHITECTURE!r}")

    def number(key: str) -> Any:
        return gguf.required_field(f"{ARCHITECTURE}.{key}")

    hidden, heads = int(number("embedding_length")), int(number("attention.head_count"))
    vocab = gguf.field(f"{ARCHITECTURE}.vocab_size") or len(gguf.required_field("tokenizer.ggml.tokens"))
    return LlamaHyperParams(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(number("feed_forward_length")),
        num_layers=int(number("block_count")),
        num_heads=heads,
        num_kv_heads=int(gguf.field(f"{ARCHITECTURE}.attention.head_count_kv", heads)),
        head_dim=int(gguf.field(f"{ARCHITECTURE}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(number("attention.layer_norm_rms_epsilon")),
        rope_theta=float(gguf.field(f"{ARCHITECTURE}.rope.freq_base", 10000.0)),
        context_length=int(number("context_length")),
        tie_word_embeddings="output.weight" not in gguf.tensor_names(),
    )


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of q/k: [H*Dh, D] interleaved -> rotate-half layout."""
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows do not split into {num_heads} heads of even size"
    half = rows // num_heads // 2
    # [H, Dh/2, 2, D] -> [H, 2, Dh/2, D]: row 2j+s of a head goes to row s*Dh/2 + j.
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_llama_weights(gguf: GGUFFile) -> LlamaWeights:
    """Every weight of a llama GGUF, dequantised, renamed into Hugging Face's layout and checked for shape."""
    hp = read_llama_hparams(gguf)
    d, i, v = hp.hidden_size, hp.intermediate_size, hp.vocab_size
    q_rows, kv_rows = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = gguf.tensor(name)
        if tuple(tensor.shape) != shape:
            raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        return tensor

    layers = []
    for layer in range(hp.num_layers):
        p = f"blk.{layer}"
        layers.append(
            LlamaLayer(
                input_norm=read(f"{p}.attn_norm.weight", (d,)),
                q_proj=unpermute_rope_rows(read(f"{p}.attn_q.weight", (q_rows, d)), hp.num_heads),
                k_proj=unpermute_rope_rows(read(f"{p}.attn_k.weight", (kv_rows, d)), hp.num_kv_heads),
                v_proj=read(f"{p}.attn_v.weight", (kv_rows, d)),
                o_proj=read(f"{p}.attn_output.weight", (d, q_rows)),
                post_attention_norm=read(f"{p}.ffn_norm.weight", (d,)),
                gate_proj=read(f"{p}.ffn_gate.weight", (i, d)),
                up_proj=read(f"{p}.ffn_up.weight", (i, d)),
                down_proj=read(f"{p}.ffn_down.weight", (d, i)),
            )
        )
    lm_head = None if hp.tie_word_embeddings else read("output.weight", (v, d))
    logger.info("read %d llama layers from %s", hp.num_layers, gguf.path.name)
    return LlamaWeights(
        hparams=hp, embed=read("token_embd.weight", (v, d)), layers=layers,
        final_norm=read("output_norm.weight", (d,)), lm_head=lm_head,
    )
