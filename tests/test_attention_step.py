"""One attention step mixing decode tokens, a prefill chunk with history, a fresh prefill chunk and a
sliding window equals dense attention computed per sequence over its whole prefix.

The KV history is written by earlier steps through the same ``attention``; the sequences' block tables
interleave (blocks reserved in turns), so the torch path gathers as well as takes views.

Dimensions: T tokens in the step, D hidden, H heads, Hkv kv heads, Dh head dim, n a sequence's tokens.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from moeshard.cluster.model.attention import attention, project_qkv, step_layout
from moeshard.cluster.model.batch import SequenceChunk, StepBatch
from moeshard.cluster.model.checkpoint import LayerWeights
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.kv_cache import KVCache
from moeshard.cluster.model.layers import RotaryEmbedding, apply_rotary
from moeshard.kernels import ENV_VAR

D, H, HKV, DH = 32, 4, 2, 8
LENGTHS = {0: 11, 1: 16, 2: 4, 3: 6}  # sequence -> tokens it has after the mixed step
# Step 1 prefills 0, 1, 2 in part; the mixed step then decodes 0 and 2, continues 1 from position 7 and
# prefills 3 from position 0.
STEP1 = ((0, 0, 10), (1, 0, 7), (2, 0, 3))  # (sequence, start, tokens)
MIXED = ((0, 10, 1), (1, 7, 9), (2, 3, 1), (3, 0, 6))


def model_config(window: int | None) -> ModelConfig:
    return ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=32, hidden_size=D, num_layers=2, num_heads=H, num_kv_heads=HKV,
        head_dim=DH, intermediate_size=8, num_experts=2, experts_per_token=1, rms_norm_eps=1e-5, rope_theta=1e4,
        max_position_embeddings=64, sliding_window=window,
    )  # fmt: skip


def layer_weights(seed: int) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    return LayerWeights(
        input_norm=torch.ones(D), qkv_proj=torch.cat([matrix(H * DH, D), matrix(HKV * DH, D), matrix(HKV * DH, D)]),
        o_proj=matrix(D, H * DH), post_attention_norm=torch.ones(D), router=matrix(2, D),
    )  # fmt: skip


def interleave_tables(cache: KVCache) -> None:
    """Reserve one block at a time in turns (0, 1, 2, 0, 1): sequences 0 and 1 get non-consecutive blocks."""
    held: dict[int, int] = {}
    for seq in (0, 1, 2, 0, 1):
        held[seq] = held.get(seq, 0) + cache.block_size
        cache.reserve(seq, held[seq])


def run_step(config, weights, layer, cache, rotary_emb, inputs, chunks) -> dict[int, torch.Tensor]:
    """Reserve, run ``attention`` over one step of (sequence, start, tokens); each sequence's output rows."""
    for seq, start, n in chunks:
        cache.reserve(seq, start + n)
    batch = StepBatch.build([(SequenceChunk(seq, start, n), [0] * n) for seq, start, n in chunks])
    x = torch.cat([inputs[seq][start : start + n] for seq, start, n in chunks])  # [T, D]
    rotary = rotary_emb.tables(batch.positions, torch.float32)
    out = attention(config, weights, layer, x, step_layout(batch, cache, config.sliding_window), rotary, cache)  # [T, D]
    rows = torch.tensor([n for _, _, n in chunks]).cumsum(0).tolist()
    return {seq: out[end - n : end] for (seq, _, n), end in zip(chunks, rows)}


def dense_attention(config, weights, rotary_emb, x: torch.Tensor) -> torch.Tensor:
    """x [n, D], a whole sequence -> [n, D]: causal (and windowed) attention over all of it, no cache."""
    n = x.shape[0]
    qkv = project_qkv(config, weights, x)
    rotary = rotary_emb.tables(torch.arange(n), torch.float32)
    q, k, v = (z.transpose(0, 1) for z in (apply_rotary(qkv.q, rotary), apply_rotary(qkv.k, rotary), qkv.v))
    k, v = k.repeat_interleave(H // HKV, 0), v.repeat_interleave(H // HKV, 0)  # [H, n, Dh]
    pos = torch.arange(n)
    visible = pos[None, :] <= pos[:, None]  # [n, n]
    if config.sliding_window is not None:
        visible &= pos[:, None] - pos[None, :] < config.sliding_window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # [H, n, Dh]
    return out.transpose(0, 1).reshape(n, H * DH) @ weights.o_proj.T


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [None, 3, 8])
def test_a_mixed_step_equals_dense_attention_per_sequence(window, backend, monkeypatch):
    monkeypatch.setenv(ENV_VAR, backend)
    module = importlib.import_module("moeshard.kernels.paged_attention")
    triton_calls, triton_path = [], module.paged_attention_triton
    monkeypatch.setattr(module, "paged_attention_triton", lambda *args: triton_calls.append(1) or triton_path(*args))
    config = model_config(window)
    weights = [layer_weights(0), layer_weights(1)]
    cache = KVCache(num_layers=2, num_kv_heads=HKV, head_dim=DH, num_blocks=24, block_size=4, dtype=torch.float32)
    interleave_tables(cache)
    rotary_emb = RotaryEmbedding(DH, config.rope_theta)
    g = torch.Generator().manual_seed(7)
    inputs = {seq: torch.randn(n, D, generator=g) for seq, n in LENGTHS.items()}
    for layer in (0, 1):  # layer 1 checks that each layer reads and writes its own cache
        run_step(config, weights[layer], layer, cache, rotary_emb, inputs, STEP1)
        got = run_step(config, weights[layer], layer, cache, rotary_emb, inputs, MIXED)
        for seq, start, n in MIXED:
            want = dense_attention(config, weights[layer], rotary_emb, inputs[seq][: start + n])[start:]
            torch.testing.assert_close(got[seq], want, rtol=1e-5, atol=1e-5)
    assert bool(triton_calls) == (backend == "triton")


def test_the_tables_interleave():
    cache = KVCache(num_layers=1, num_kv_heads=HKV, head_dim=DH, num_blocks=8, block_size=4, dtype=torch.float32)
    interleave_tables(cache)
    assert cache.block_table(0) == [0, 3] and cache.block_table(1) == [1, 4] and cache.block_table(2) == [2]
