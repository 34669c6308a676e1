"""Logprobs and the sampling controls against transformers: the same checkpoint's logits, and a reference
sampling loop that applies transformers' own logits processors (repetition penalty, temperature, min_p,
top_k, top_p) plus OpenAI's additive frequency/presence rule and logit_bias, drawing with the same seed."""

from __future__ import annotations

import pytest
import torch

from moeshard.cluster import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 17, 2, 64], [1, 100, 7, 7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def llm(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(tiny_mixtral_dir):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32, experts_implementation="eager").eval()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double()  # [T, V]


def test_generated_and_prompt_logprobs_equal_transformers_log_softmax(llm, hf):
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=7, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params)[0]
    ids = PROMPTS[0] + out.token_ids
    reference = hf_logits(hf, ids).log_softmax(-1)  # [T, V]
    assert len(out.logprobs) == len(out.token_ids) == 8
    for i, entry in enumerate(out.logprobs):
        row = reference[len(PROMPTS[0]) - 1 + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        top = torch.topk(row, 5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPTS[0])
    for pos in range(1, len(PROMPTS[0])):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == PROMPTS[0][pos]
        assert entry.logprob == pytest.approx(float(reference[pos - 1, PROMPTS[0][pos]]), abs=1e-4)
        assert [t for t, _ in entry.top] == torch.topk(reference[pos - 1], 3).indices.tolist()


def test_prompt_logprobs_are_the_same_in_chunks_and_in_a_batch(tiny_mixtral_dir, llm):
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    alone = llm.generate([PROMPTS[2]], params)[0]
    with LLM(tiny_mixtral_dir, max_batch_tokens=3) as chunked:
        outs = chunked.generate(PROMPTS, params)
    for out, prompt in zip(outs, PROMPTS):
        assert len(out.prompt_logprobs) == len(prompt) and [e.token_id for e in out.prompt_logprobs[1:]] == prompt[1:]
    for a, b in zip(outs[2].prompt_logprobs[1:], alone.prompt_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def reference_scores(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [V] -> the scores a token is drawn from (or the argmax taken of, when greedy)."""
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.clone()[None]  # [1, V]
    for token_id, bias in params.logit_bias.items():
        scores[0, token_id] += bias
    ids = torch.tensor([prompt + output])
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    for token_id in set(output):  # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
        scores[0, token_id] -= output.count(token_id) * params.frequency_penalty + params.presence_penalty
    if params.greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.min_p > 0:
        scores = MinPLogitsWarper(params.min_p)(ids, scores)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return scores[0]


def reference_generate(hf, prompt: list[int], params: SamplingParams) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    output: list[int] = []
    for _ in range(params.max_tokens):
        scores = reference_scores(hf_logits(hf, prompt + output)[-1], params, prompt, output)  # [V]
        if params.greedy:
            output.append(int(scores.argmax()))
        else:
            logprobs = scores.log_softmax(-1)
            output.append(int(torch.multinomial((logprobs - logprobs.max()).exp(), 1, generator=generator)))
    return output


CASES = [
    dict(temperature=0.0, repetition_penalty=1.8),
    dict(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
    dict(temperature=0.0, logit_bias={3: 100.0}),
    dict(temperature=0.0, logit_bias={7: 8.0, 9: -100.0}, presence_penalty=2.0),
    dict(temperature=1.3, frequency_penalty=0.8, presence_penalty=-0.4),
    dict(temperature=0.7, repetition_penalty=1.3, top_k=10),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.5, min_p=0.1, top_k=20, top_p=0.8, repetition_penalty=0.8),
    dict(temperature=0.9, logit_bias={11: 5.0}, top_p=0.9, frequency_penalty=-1.0),
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(c) for c in CASES])
def test_sampling_equals_reference_loop_over_transformers_logits(llm, hf, case):
    params = SamplingParams(max_tokens=12, seed=2024, ignore_eos=True, **case)
    for prompt in PROMPTS[:2]:
        assert llm.generate([prompt], params)[0].token_ids == reference_generate(hf, prompt, params)


def test_controls_are_batch_independent(llm):
    params = [SamplingParams(max_tokens=10, seed=s, ignore_eos=True, **CASES[-1 - s]) for s in range(len(PROMPTS))]
    alone = [llm.generate([p], [q])[0].token_ids for p, q in zip(PROMPTS, params)]
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == alone


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(ValueError, match="logit_bias token id 500"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, logit_bias={500: 1.0}))
