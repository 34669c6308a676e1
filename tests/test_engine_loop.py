"""The serving engine's loop never leaves a request waiting: a dead loop answers everyone, deadlines are kept."""

from __future__ import annotations

import asyncio
import time

import pytest

from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.async_engine import AsyncEngine, EngineStopped, RequestFailed
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture
def engine(tiny_mixtral_dir):
    config = EngineConfig(model_dir=str(tiny_mixtral_dir))
    return build_engine(config, read_model_files(tiny_mixtral_dir))


async def _collect(handle) -> list[int]:
    tokens = []
    async for delta in handle.stream():
        tokens.extend(delta.token_ids)
    return tokens


def test_a_dead_loop_answers_every_request_at_once(engine):
    async def scenario():
        served = AsyncEngine(engine, None)
        ok = await _collect(served.submit([1, 5, 9], GREEDY))
        assert len(ok) == 8

        def broken_step():
            raise SystemExit("simulated crash of the loop thread")  # not an Exception: escapes the step's handler

        engine.step = broken_step
        handles = [served.submit([1, 2, 3 + i], GREEDY) for i in range(4)]
        started = time.monotonic()
        results = await asyncio.gather(*(_collect(h) for h in handles), return_exceptions=True)
        assert all(isinstance(r, RequestFailed) and "engine loop stopped" in str(r) for r in results), results
        assert time.monotonic() - started < 10
        served._thread.join(timeout=10)
        assert not served.is_running
        with pytest.raises(EngineStopped):
            served.submit([1, 2, 3], GREEDY)

    asyncio.run(scenario())


def test_a_request_past_its_deadline_fails_and_frees_its_cache(engine):
    async def scenario():
        served = AsyncEngine(engine, None, request_timeout_s=1.0)
        step = engine.step

        def slow_step():
            time.sleep(0.3)
            return step()

        engine.step = slow_step
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="did not finish within 1s"):
            await _collect(served.submit([1, 5, 9], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)))
        assert time.monotonic() - started < 5
        engine.step = step
        assert await _collect(served.submit([1, 5, 9], GREEDY))  # the loop still serves
        deadline = time.monotonic() + 5
        while engine.cache.usage().used_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.cache.usage().used_blocks == 0
        served.shutdown()

    asyncio.run(scenario())


def test_a_wedged_loop_still_bounds_the_wait(engine):
    """Even if the loop thread never comes back from a step, the stream gives up after the deadline and its grace."""

    async def scenario():
        import moeshard.cluster.engine.async_engine as module

        served = AsyncEngine(engine, None, request_timeout_s=0.5)
        module_grace, module.ANSWER_GRACE_S = module.ANSWER_GRACE_S, 0.5
        engine.step = lambda: time.sleep(3600)
        try:
            started = time.monotonic()
            with pytest.raises(RequestFailed, match="deadline"):
                await _collect(served.submit([1, 5, 9], GREEDY))
            assert time.monotonic() - started < 5
        finally:
            module.ANSWER_GRACE_S = module_grace

    asyncio.run(scenario())
