"""Prefix caching: shared computed blocks change no output; blocks are counted, chained, evicted LRU; n > 1 prefills once."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import MixtralForCausalLM

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model.kv_cache import KVCache

BLOCK = 16
rng = random.Random(7)
PREFIX = [1] + [rng.randrange(2, 128) for _ in range(52)]  # 53 tokens: three full blocks and a bit
TAILS = [[5, 9, 33], [100], [7, 7, 7, 64, 12, 90, 4, 3, 3, 9, 11, 40, 41, 42, 43, 44, 45], [17, 2]]
PROMPTS = [PREFIX + tail for tail in TAILS]


def _cache(num_blocks: int = 8) -> KVCache:
    return KVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=BLOCK, dtype=torch.float32)


def _hits(llm: LLM) -> int:
    return llm._engine.cache.usage().prefix_hit_tokens


# -- the cache's bookkeeping ----------------------------------------------------------
def test_computed_full_blocks_are_shared_and_the_last_token_is_always_computed():
    cache = _cache()
    tokens = list(range(1, 41))  # 40 tokens: two full blocks
    assert cache.admit(0, tokens, cache.plan_admission(tokens)) == 0
    cache.commit(0, tokens, 40)
    assert cache.usage().cached_blocks == 2

    plan = cache.plan_admission(tokens)
    assert plan.cached_blocks == tuple(cache._tables[0][:2]) and plan.blocks_to_take == 1
    assert cache.admit(1, tokens, plan) == 32
    assert cache._tables[1][:2] == cache._tables[0][:2]  # the same physical blocks
    assert cache.usage().used_blocks == 3 + 1

    exact = tokens[:32]  # two full blocks and nothing after: the second is recomputed for the last token's logits
    assert len(cache.plan_admission(exact).cached_blocks) == 1
    assert cache.plan_admission(tokens, use_cache=False).cached_blocks == ()


def test_a_block_key_names_its_whole_prefix():
    cache = _cache()
    tokens = list(range(1, 41))
    cache.admit(0, tokens, cache.plan_admission(tokens))
    cache.commit(0, tokens, 40)
    other_first_block = [99] + tokens[1:]  # block 1 has the same tokens, block 0 does not
    assert cache.plan_admission(other_first_block).cached_blocks == ()


def test_released_blocks_stay_cached_until_evicted_tail_first():
    cache = _cache(num_blocks=4)
    a = list(range(1, 49))  # three full blocks
    cache.admit(0, a, cache.plan_admission(a))
    cache.commit(0, a, 48)
    cache.free(0)
    usage = cache.usage()
    assert usage.used_blocks == 0 and usage.cached_blocks == 3 and cache.num_free_blocks == 4

    b = [120] * 20  # two new blocks: the free one, then an eviction
    cache.admit(1, b, cache.plan_admission(b))
    assert cache.usage().cached_blocks == 2
    assert len(cache.plan_admission(a + [1]).cached_blocks) == 2  # the tail block went, the prefix stayed

    cache.free(1)
    assert cache.num_free_blocks == 4


def test_a_block_being_computed_is_waited_for():
    cache = _cache()
    tokens = list(range(1, 41))
    cache.admit(0, tokens, cache.plan_admission(tokens))
    assert cache.plan_admission(tokens).waits_for_other
    cache.commit(0, tokens, 16)
    plan = cache.plan_admission(tokens)
    assert plan.waits_for_other and len(plan.cached_blocks) == 1  # block 1 is still being computed
    cache.commit(0, tokens, 40)
    plan = cache.plan_admission(tokens)
    assert not plan.waits_for_other and len(plan.cached_blocks) == 2

    cache.free(0)
    other = list(range(2, 42))
    cache.admit(2, other, cache.plan_admission(other))
    cache.free(2)  # a sequence that leaves before computing its blocks is not waited for
    assert not cache.plan_admission(other).waits_for_other


def test_without_prefix_caching_nothing_is_shared():
    cache = KVCache(1, 1, 2, 8, BLOCK, torch.float32, prefix_caching=False)
    tokens = list(range(1, 41))
    cache.admit(0, tokens, cache.plan_admission(tokens))
    cache.commit(0, tokens, 40)
    assert cache.plan_admission(tokens).cached_blocks == () and cache.usage().cached_blocks == 0


# -- the engine: identical outputs ----------------------------------------------------
@pytest.fixture(scope="module")
def cold(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir, enable_prefix_caching=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def warm(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        yield llm


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_requests_sharing_a_prefix_get_the_outputs_of_a_cold_cache(cold, warm, params):
    before = _hits(warm)
    expected = [cold.generate(p, params)[0] for p in PROMPTS]
    got = [warm.generate(p, params)[0] for p in PROMPTS]  # one at a time: each after the first finds the prefix
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert _hits(warm) - before >= 3 * BLOCK * (len(PROMPTS) - 1)
    assert _hits(cold) == 0
    if params.logprobs:
        for ours, reference in zip(got, expected):
            for a, b in zip(ours.logprobs, reference.logprobs):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
                assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_a_cached_prefix_generates_what_transformers_generates(tiny_mixtral_dir, warm):
    reference = MixtralForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32, experts_implementation="eager").eval()
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    warm.generate(PROMPTS[0], params)
    before = _hits(warm)
    out = warm.generate(PROMPTS[2], params)[0]
    assert _hits(warm) - before >= 3 * BLOCK
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert out.token_ids == theirs[0, len(PROMPTS[2]) :].tolist()


def test_the_next_turn_reuses_the_answer_blocks(cold, warm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    first = warm.generate(PROMPTS[1], params)[0]
    turn2 = PROMPTS[1] + first.token_ids + [3, 4, 5]
    before = _hits(warm)
    second = warm.generate(turn2, params)[0]
    computed_before = len(PROMPTS[1]) + len(first.token_ids) - 1  # the last sampled token was never fed back
    assert _hits(warm) - before == computed_before // BLOCK * BLOCK
    assert second.token_ids == cold.generate(turn2, params)[0].token_ids


def test_identical_prompts_in_one_batch_prefill_once(tiny_mixtral_dir, cold):
    """n > 1 choices are identical prompts submitted together: the later ones wait for the first's blocks."""
    prompt = [1] + [rng.randrange(2, 128) for _ in range(70)]
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    with LLM(tiny_mixtral_dir) as fresh:
        outputs = fresh.generate([prompt] * 4, [params] * 4)
        assert fresh._engine.cache.usage().prefix_hit_tokens == 3 * ((len(prompt) - 1) // BLOCK * BLOCK)
    expected = cold.generate([prompt] * 4, [params] * 4)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]


def test_prompt_logprobs_are_computed_over_the_whole_prompt(cold, warm):
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    warm.generate(PROMPTS[3], SamplingParams(max_tokens=1, temperature=0))
    ours = warm.generate(PROMPTS[3], params)[0].prompt_logprobs
    theirs = cold.generate(PROMPTS[3], params)[0].prompt_logprobs
    assert len(ours) == len(theirs) == len(PROMPTS[3]) and ours[0] is None
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_eviction_and_preemption_under_a_small_cache_change_no_output(tiny_mixtral_dir, cold):
    """Seven blocks for four growing sequences sharing a prefix: blocks are shared, evicted and recomputed."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in cold.generate(PROMPTS, params)]
    block_bytes = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head dim x fp32
    with LLM(tiny_mixtral_dir, kv_cache_bytes=7 * block_bytes, kv_block_size=BLOCK) as small:
        assert small._engine.cache.num_blocks == 7
        for _ in range(2):
            assert [o.token_ids for o in small.generate(PROMPTS, params)] == expected
        usage = small._engine.cache.usage()
        assert usage.used_blocks == 0 and usage.prefix_hit_tokens > 0


def test_routing_capture_computes_every_row_even_with_the_prefix_cached(cold, warm):
    warm.generate(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))
    before = _hits(warm)
    routed = warm.route_tokens(PROMPTS[0])
    assert _hits(warm) == before  # nothing was taken from the cache
    assert torch.equal(routed.expert_ids, cold.route_tokens(PROMPTS[0]).expert_ids)


def test_a_waiting_prompt_is_hashed_once_not_every_step(tiny_mixtral_dir, monkeypatch):
    from moeshard.cluster.engine.assembly import build_engine, read_model_files
    from moeshard.cluster.engine.config import EngineConfig

    block_bytes = 2 * 2 * BLOCK * 2 * 16 * 4  # as above
    config = EngineConfig(model_dir=str(tiny_mixtral_dir), kv_cache_bytes=5 * block_bytes, kv_block_size=BLOCK)
    engine = build_engine(config, read_model_files(tiny_mixtral_dir))
    hashed: list[int] = []
    real = engine.cache.block_keys
    monkeypatch.setattr(engine.cache, "block_keys", lambda ids: hashed.append(len(ids)) or real(ids))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    other = [2] * 40  # three blocks, none shared
    engine.add_request("first", PROMPTS[0], params)  # four of the five blocks
    engine.add_request("second", other, params)  # waits at the head of the queue until the first is done
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert steps >= 12  # the second waited through the first's six steps
    assert hashed == [len(PROMPTS[0]), len(other)]
