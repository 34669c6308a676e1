"""Our single-process Mixtral equals transformers' MixtralForCausalLM on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from moeshard.cluster import LLM, SamplingParams

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


def test_prefill_logits_match_transformers(variant):
    llm, reference = variant
    for prompt in PROMPTS:
        ours = llm.logits(prompt)
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt])).logits[0].float()
        assert ours.shape == theirs.shape == (len(prompt), reference.config.vocab_size)
        assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers_generate(variant):
    llm, reference = variant
    eos = reference.config.eos_token_id
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            generated = reference.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        assert out.token_ids == generated
        assert out.finish_reason == ("stop" if generated[-1] == eos else "length")
