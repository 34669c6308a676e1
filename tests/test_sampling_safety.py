"""The sampler is numerically safe for every accepted parameter, and a sequence that fails to sample fails alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine import engine as engine_module
from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.async_engine import AsyncEngine, RequestFailed
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.sampling import SamplingError, greedy_rows, make_generator, sample_token

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
temperatures = st.one_of(
    st.just(0.0), st.floats(min_value=0.0, max_value=2.0), st.sampled_from([5e-324, 1e-300, 1e-38, 1e-8, 2.0])
)
top_ps = st.one_of(st.floats(min_value=5e-324, max_value=1.0, exclude_min=False), st.sampled_from([5e-324, 1e-12, 1.0]))
top_ks = st.one_of(st.just(-1), st.integers(min_value=1, max_value=40), st.just(2**63 - 1))
logit_rows = st.lists(
    st.one_of(st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, width=32), st.sampled_from([0.0, FLOAT32_MAX, -FLOAT32_MAX])),
    min_size=1,
    max_size=32,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=logit_rows, temperature=temperatures, top_p=top_ps, top_k=top_ks, seed=st.integers(-(2**63), 2**63 - 1))
def test_every_accepted_parameter_samples_a_valid_token(row, temperature, top_p, top_k, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + 15)  # may pass 2**63
    token = sample_token(logits, params, make_generator(params))
    assert 0 <= token < len(row)
    best = logits.max()
    if temperature == 0.0 or top_k == 1:
        assert logits[token] == best  # greedy, or only the best survives top_k
    if top_k > 0:
        assert int((logits > logits[token]).sum()) < top_k  # the token is within the top k (ties kept)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row=logit_rows,
    temperature=temperatures,
    min_p=st.one_of(st.floats(min_value=0.0, max_value=1.0), st.sampled_from([5e-324, 1.0])),
    penalties=st.tuples(*[st.floats(min_value=-2.0, max_value=2.0)] * 2, st.sampled_from([1e-9, 0.5, 1.0, 1.3, 100.0])),
    bias=st.floats(min_value=-100.0, max_value=100.0),
    history=st.lists(st.integers(min_value=0, max_value=31), max_size=8),
    seed=st.integers(0, 2**63 - 1),
)
def test_penalties_bias_and_min_p_sample_a_valid_token(row, temperature, min_p, penalties, bias, history, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    frequency, presence, repetition = penalties
    params = SamplingParams(
        max_tokens=1, temperature=temperature, min_p=min_p, frequency_penalty=frequency, presence_penalty=presence,
        repetition_penalty=repetition, logit_bias={0: bias}, seed=seed,
    )  # fmt: skip
    history = [t for t in history if t < len(row)]
    token = sample_token(logits, params, make_generator(params), history[:2], history[2:])
    assert 0 <= token < len(row)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise_a_sampling_error(bad):
    logits = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(SamplingError, match="non-finite"):
        sample_token(logits, SamplingParams(max_tokens=1, temperature=0.7), torch.Generator())


def test_tiny_temperature_and_top_p_equal_greedy():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 30
    for params in (SamplingParams(1, temperature=1e-300), SamplingParams(1, temperature=0.9, top_p=1e-300)):
        generator = make_generator(params)
        assert {sample_token(logits, params, generator) for _ in range(20)} == {int(logits.argmax())}


def _fail_seed(monkeypatch, failing_seed: int) -> None:
    real = engine_module.sample_token

    def sample(row, params, generator, *history):
        if params.seed == failing_seed:
            raise RuntimeError("injected sampling failure")
        return real(row, params, generator, *history)

    monkeypatch.setattr(engine_module, "sample_token", sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_rows_together_equal_sample_token_row_by_row(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 500, generator=g).mul(4).to(dtype)  # [R, V]
    logits[2, 10] = logits[2, 400] = logits[2].max() + 1  # a tie: the first index wins in both
    logits[5, :] = 7.0  # every token tied
    logits[6, 3] = float("nan")
    logits[7, 99] = float("inf")
    logits[8, :] = float("-inf")
    logits[9, :3] = torch.finfo(dtype).max  # finite, but its sum overflows: left to sample_token, which takes it
    greedy = SamplingParams(max_tokens=1, temperature=0)
    chosen = greedy_rows(logits).token_ids
    assert chosen[9] is None and sample_token(logits[9], greedy, make_generator(greedy)) == 0
    for i, row in enumerate(logits[:9]):
        if i >= 6:
            assert chosen[i] is None
            with pytest.raises(SamplingError):
                sample_token(row, greedy, make_generator(greedy))
        else:
            assert chosen[i] == sample_token(row, greedy, make_generator(greedy))
    assert chosen[2] == 10 and chosen[5] == 0
    assert greedy_rows(logits[:0]).token_ids == []
    narrowed = logits[:6, :300]  # a strided view, as the engine passes rows cut to the tokenizer's vocabulary
    assert greedy_rows(narrowed).token_ids == [sample_token(row, greedy, make_generator(greedy)) for row in narrowed]


def test_a_step_of_mixed_sampling_gives_each_sequence_its_tokens_alone(tiny_mixtral_dir):
    """Plain greedy sequences take their tokens together; greedy with penalties or bias, and drawn ones, one by one."""
    prompts = [[1, 5, 9, 33], [1, 100, 7], [1, 2, 3, 4, 5, 6], [1, 77, 78], [1, 5, 9, 33, 40]]
    params = [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0, logit_bias={5: 3.0}, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    ]
    with LLM(tiny_mixtral_dir) as llm:
        alone = [llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]
        together = [out.token_ids for out in llm.generate(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == [10, 7, 10, 9, 10]


def test_one_failing_sequence_fails_alone_offline(tiny_mixtral_dir, monkeypatch):
    prompts = [[1, 5, 9, 33], [1, 100, 7], [1, 2, 3, 4, 5, 6]]
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 13, 2)]
    with LLM(tiny_mixtral_dir) as llm:
        alone = [llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]
        _fail_seed(monkeypatch, 13)
        together = llm.generate(prompts, params)
        assert together[1].finish_reason == "error" and "injected sampling failure" in together[1].error
        assert [together[0].token_ids, together[2].token_ids] == [alone[0], alone[2]]
        assert llm._engine.cache.usage().used_blocks == 0 and not llm._engine.has_work()


def test_one_failing_sequence_fails_alone_in_the_serving_loop(tiny_mixtral_dir, monkeypatch):
    files = read_model_files(tiny_mixtral_dir)
    engine = build_engine(EngineConfig(model_dir=str(tiny_mixtral_dir)), files)
    async_engine = AsyncEngine(engine, None)
    params = {s: SamplingParams(max_tokens=10, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 13)}

    async def run(seed: int, done: list) -> list[int] | str:
        handle = async_engine.submit([1, 5, 9], params[seed], on_done=lambda: done.append(seed))
        try:
            return [t async for d in handle.stream() for t in d.token_ids]
        except RequestFailed as exc:
            return str(exc)

    async def both() -> tuple[list, list]:
        done: list[int] = []
        return list(await asyncio.gather(run(1, done), run(13, done))), done

    try:
        (alone, _), _ = asyncio.run(both())
        _fail_seed(monkeypatch, 13)
        (ok, failed), done = asyncio.run(both())
        assert ok == alone and len(ok) == 10
        assert failed == "injected sampling failure"
        assert sorted(done) == [1, 13]  # every request reported leaving the engine exactly once
        assert async_engine.is_running and engine.cache.usage().used_blocks == 0
    finally:
        async_engine.shutdown()


def test_running_sequences_are_capped(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir, max_running=2) as llm:
        engine = llm._engine
        for i in range(5):
            engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        running = []
        while engine.has_work():
            engine.step()
            running.append(len(engine.running))
        assert max(running) == 2


def _rows_seen_by_sampling(monkeypatch) -> list[bool]:
    """Record, for every token sampled, whether its logits row reached ``Engine._sample``."""
    seen: list[bool] = []
    real = engine_module.Engine._sample

    def sample(self, seq, row, chosen=None):
        seen.append(row is not None)
        return real(self, seq, row, chosen)

    monkeypatch.setattr(engine_module.Engine, "_sample", sample)
    return seen


def test_greedy_taken_where_the_logits_are_gives_the_host_paths_outputs(tiny_mixtral_dir, monkeypatch):
    """``greedy_on_device`` (the default on a GPU) forced on the CPU: a step of plain greedy sequences without
    logprobs never hands its rows to the sampler, and every output, with mixed parameters, logprobs and prompt
    logprobs in the same steps, is the host path's."""
    prompts = [[1, 5, 9, 33], [1, 100, 7], [1, 2, 3, 4, 5, 6], [1, 77, 78], [1, 5, 9, 33, 40]]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    mixed = [
        greedy,
        SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.8, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=1, ignore_eos=True),
        greedy,
    ]
    with LLM(tiny_mixtral_dir) as llm:
        engine = llm.engine
        engine.greedy_on_device = False
        want_greedy = llm.generate(prompts, greedy)
        want_mixed = llm.generate(prompts, mixed)
        engine.greedy_on_device = True
        seen = _rows_seen_by_sampling(monkeypatch)
        got_greedy = llm.generate(prompts, greedy)
        assert len(seen) == 5 * 8 and not any(seen)  # every token chosen without its row on the host
        seen.clear()
        got_mixed = llm.generate(prompts, mixed)
        assert all(seen)  # each step held a sequence that reads its row: the logits came to the host
    assert [o.token_ids for o in got_greedy] == [o.token_ids for o in want_greedy]
    for got, want in zip(got_mixed, want_mixed):
        assert (got.token_ids, got.logprobs, got.prompt_logprobs) == (want.token_ids, want.logprobs, want.prompt_logprobs)
    assert got_mixed[1].logprobs is not None and got_mixed[3].prompt_logprobs is not None


def test_greedy_taken_where_the_logits_are_fails_a_row_that_is_not_finite_alone(tiny_mixtral_dir, monkeypatch):
    """A NaN in one sequence's row: that sequence fails with the host sampler's error, the others go on."""
    prompts = [[1, 5, 9, 33], [1, 100, 7], [1, 2, 3, 4, 5, 6]]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(tiny_mixtral_dir) as llm:
        engine = llm.engine
        engine.greedy_on_device = True
        alone = [llm.generate([p], greedy)[0].token_ids for p in prompts]
        forward = engine.model.forward

        def poisoned(batch, logits_rows=None):
            logits = forward(batch, logits_rows=logits_rows)  # [R, V]
            if batch.token_ids.numel() == 3:  # a decode step of all three: the second sequence's row
                logits = logits.clone()
                logits[1, 7] = float("nan")
            return logits

        monkeypatch.setattr(engine.model, "forward", poisoned)
        together = llm.generate(prompts, greedy)
        assert together[1].finish_reason == "error" and "non-finite logits" in together[1].error
        assert [together[0].token_ids, together[2].token_ids] == [alone[0], alone[2]]
        assert engine.cache.usage().used_blocks == 0 and not engine.has_work()
