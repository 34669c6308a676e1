"""Engine invariants: incremental decoding equals one prefill; batching and chunking change nothing."""

from __future__ import annotations

import os

import pytest
import torch

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model.batch import SequenceChunk, StepBatch
from moeshard.kernels.decode_mirror import DecodeMirror
from moeshard.kernels.linear import route_for

PROMPTS = [[1, 5, 9, 33, 17, 2, 64], [1, 100], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4, 3, 3, 9, 11, 40, 41, 42]]


@pytest.fixture(scope="module")
def llm(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        yield llm


def test_token_by_token_decode_equals_one_prefill(llm):
    sequence = PROMPTS[2]
    full = llm.logits(sequence)  # [T, V]
    engine = llm._engine
    seq_id = 10_000
    engine.cache.reserve(seq_id, len(sequence))
    try:
        for pos, token in enumerate(sequence):
            batch = StepBatch.build([(SequenceChunk(seq_id, pos, 1), [token])])
            step_logits = engine.model.forward(batch)[0]
            assert (step_logits - full[pos]).abs().max().item() < 1e-4
    finally:
        engine.cache.free(seq_id)


def test_batch_of_different_lengths_equals_each_alone(llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert together == alone
    assert all(len(t) == 20 for t in together)


def test_chunked_prefill_equals_whole_prefill(tiny_mixtral_dir, llm):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    with LLM(tiny_mixtral_dir, max_batch_tokens=4) as chunked:
        assert [o.token_ids for o in chunked.generate(PROMPTS, params)] == expected


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    first = llm.generate(PROMPTS[0], params)[0].token_ids
    again = llm.generate(PROMPTS[0], params)[0].token_ids
    in_batch = llm.generate(PROMPTS, params)[0].token_ids
    assert first == again == in_batch
    other_seed = llm.generate(PROMPTS[0], params.model_copy(update={"seed": 99}))[0].token_ids
    assert other_seed != first


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    top1 = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True))[0].token_ids
    assert top1 == greedy


def test_max_tokens_and_stop_token_ids(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    stop_at = out.token_ids[2]
    stopped = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[stop_at], ignore_eos=True))[0]
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"


def test_kv_cache_is_empty_after_generation_and_errors(llm):
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0))
    assert llm._engine.cache.usage().used_blocks == 0
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10_000]], SamplingParams(max_tokens=4))
    assert llm._engine.cache.usage().used_blocks == 0
    assert not llm._engine.has_work()


def test_logits_dtype_and_shape(llm):
    logits = llm.logits(PROMPTS[0])
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPTS[0]), 128)


@pytest.mark.parametrize("mirror", [False, True], ids=["gathered", "decode_mirror"])
def test_preemption_under_a_small_cache_changes_no_output(tiny_mixtral_dir, llm, mirror, monkeypatch):
    """Six blocks of 16 tokens for three growing sequences: some must be preempted and recomputed. With every decode
    group read from the decode mirror, a preempted sequence's rows are dropped when its blocks are freed."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head dim x fp32
    mirrored = dict(decode_mirror_min_keys=0, decode_mirror_bytes=2**24) if mirror else {}
    steps = []
    plan = DecodeMirror.plan
    monkeypatch.setattr(DecodeMirror, "plan", lambda self, *a: steps.append(plan(self, *a)) or steps[-1])
    with LLM(tiny_mixtral_dir, kv_cache_bytes=6 * block_bytes, kv_block_size=16, **mirrored) as small:
        assert small._engine.cache.num_blocks == 6
        outputs = small.generate(PROMPTS, params)
        assert [o.token_ids for o in outputs] == expected
        assert small._engine.num_preemptions > 0
        assert small._engine.cache.usage().used_blocks == 0
    assert any(s is not None for s in steps) == mirror


def test_an_lm_head_on_more_threads_changes_no_output(tiny_checkpoint_factory):
    """lm_head_threads (default: every CPU of the process) widens the LM head's product alone; the same outputs."""
    model_dir = tiny_checkpoint_factory("wide_head", vocab_size=4096)  # an LM head [4096, 64], 2^18 elements: oneDNN's
    prompts = [[1, 5, 9, 33, 2 + i, 70] for i in range(5)] + [[1, 44]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker of one CPU
    try:
        with LLM(model_dir, lm_head_threads=1) as narrow, LLM(model_dir) as wide:
            assert narrow.engine.model.lm_head_threads == 1
            assert wide.engine.model.lm_head_threads == len(os.sched_getaffinity(0))
            assert route_for(torch.zeros(6, 64), wide.engine.model.weights.lm_head) == "onednn"
            expected, got = narrow.generate(prompts, params), wide.generate(prompts, params)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.logprobs for o in got] == [o.logprobs for o in expected]
