"""Our single-process Mixtral equals transformers' MixtralForCausalLM on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from moeshard.cluster import LLM

# Each variant changes what could go wrong: routing width, GQA ratio, odd sizes, tying, sliding window.
VARIANTS = {
    "top2_gqa2": dict(num_local_experts=8, num_experts_per_tok=2),
    "top1_mha": dict(num_local_experts=4, num_experts_per_tok=1, num_attention_heads=4, num_key_value_heads=4, hidden_size=48),
    "dense_topk_gqa4_odd": dict(
        num_local_experts=4, num_experts_per_tok=4, hidden_size=36, head_dim=8,
        num_attention_heads=8, num_key_value_heads=2, intermediate_size=37,
    ),
    "tied_odd": dict(
        num_local_experts=3, num_experts_per_tok=2, hidden_size=33, head_dim=12,
        num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "sliding_window": dict(sliding_window=5, rope_theta=1e6, num_hidden_layers=3),
}

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(request.param, seed=len(request.param), **VARIANTS[request.param])
    # "eager" is the per-expert loop, the plainest statement of the math (grouped_mm needs aligned sizes).
    reference = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with LLM(path) as llm:
        yield llm, reference


def test_prefill_logits_match_transformers(variant, transformers_oracle):
    transformers_oracle.assert_prefill_logits(*variant, PROMPTS)


def test_greedy_tokens_match_transformers_generate(variant, transformers_oracle):
    transformers_oracle.assert_greedy_tokens(*variant, PROMPTS, max_tokens=32)
