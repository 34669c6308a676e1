"""Qwen2-MoE, Qwen3-MoE and OLMoE in one process equal transformers' own classes on the same checkpoint.

Each checkpoint is written by transformers (``save_pretrained``, the Hub key
layout); each variant turns on what could go wrong: shared expert, dense
layers, q/k norms, biases, head_dim != hidden/heads, renormalised or not,
many small experts, tying, RoPE theta, sliding window, q/k/v clipping.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from moeshard.cluster import LLM

VARIANTS = {
    "qwen2_shared_bias": ("Qwen2MoeForCausalLM", dict()),
    "qwen2_sparse_step2_norm": ("Qwen2MoeForCausalLM", dict(decoder_sparse_step=2, num_hidden_layers=3, norm_topk_prob=True)),
    "qwen2_mlp_only_tied_e64": (
        "Qwen2MoeForCausalLM",
        dict(mlp_only_layers=[0], tie_word_embeddings=True, rope_theta=1e6, num_experts=64, num_experts_per_tok=8),
    ),
    "qwen3_head_dim24": ("Qwen3MoeForCausalLM", dict()),
    "qwen3_mlp_only_bias_norm": (
        "Qwen3MoeForCausalLM",
        dict(mlp_only_layers=[1], num_hidden_layers=3, attention_bias=True, norm_topk_prob=True),
    ),
    "qwen3_e128_k8_window": (
        "Qwen3MoeForCausalLM",
        dict(num_experts=128, num_experts_per_tok=8, use_sliding_window=True, sliding_window=5, num_key_value_heads=1),
    ),
    "olmoe_e16_k4": ("OlmoeForCausalLM", dict()),
    "olmoe_clip_norm_e64_k8": ("OlmoeForCausalLM", dict(clip_qkv=0.8, norm_topk_prob=True, num_experts=64, num_experts_per_tok=8)),
    "olmoe_mha_tied": ("OlmoeForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=5e5)),
}

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tiny_family_factory):
    architecture, overrides = VARIANTS[request.param]
    path = tiny_family_factory(request.param, architecture, seed=len(request.param), **overrides)
    model_cls = getattr(transformers, architecture)
    # "eager" is the per-expert loop, the plainest statement of the math.
    reference = model_cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with LLM(path) as llm:
        yield llm, reference


def test_prefill_logits_match_transformers(variant, transformers_oracle):
    transformers_oracle.assert_prefill_logits(*variant, PROMPTS)


def test_greedy_tokens_match_transformers_generate(variant, transformers_oracle):
    transformers_oracle.assert_greedy_tokens(*variant, PROMPTS, max_tokens=24)
