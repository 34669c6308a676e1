"""Expert threads: a layer's experts shared out over CPU threads give the same values as one thread, bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.moe import ExpertStack
from moeshard.kernels.expert_ffn import expert_ffn_torch
from moeshard.kernels.expert_threads import ExpertThreads, _shares
from moeshard.kernels.linear import prepack


@pytest.fixture
def restore_torch_threads():
    """An engine with expert threads sets torch's intra-op threads to 1 for the process: put them back after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threads():
    pool = ExpertThreads(3)
    yield pool
    pool.close()


@pytest.mark.parametrize("num_tasks, count", [(1, 2), (2, 2), (5, 2), (7, 3), (8, 4), (3, 8)])
def test_shares_are_contiguous_and_even(num_tasks, count):
    shares = _shares(num_tasks, count)
    assert [i for share in shares for i in share] == list(range(num_tasks))
    sizes = [len(share) for share in shares]
    assert len(shares) == min(num_tasks, count) and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_map_keeps_order_and_uses_the_workers(threads):
    ran_on = {}

    def task(i: int):
        ran_on[i] = threading.current_thread().name
        return i * i

    assert threads.map([lambda i=i: task(i) for i in range(7)]) == [i * i for i in range(7)]
    assert ran_on[0] == threading.current_thread().name  # the caller takes the first share
    workers = {name for i, name in ran_on.items() if i >= 3}
    assert workers and all(name.startswith("moeshard-experts") for name in workers)


def test_workers_run_in_the_callers_inference_mode_on_one_torch_thread(threads):
    with torch.inference_mode():
        made = torch.zeros(6)  # an inference tensor: an in-place update outside inference mode would raise
        modes = threads.map([lambda i=i: (made[i].add_(1), torch.is_inference_mode_enabled())[1] for i in range(6)])
    assert modes == [True] * 6 and made.tolist() == [1.0] * 6
    assert threads.map([torch.get_num_threads for _ in range(6)])[2:] == [1] * 4  # the workers' shares


def test_a_failing_task_fails_the_map_once_the_workers_shares_finished(threads):
    finished = []

    def slow():
        threading.Event().wait(0.2)
        finished.append(True)

    with pytest.raises(ZeroDivisionError):
        threads.map([lambda: 1 / 0, slow, slow, slow, slow, slow])  # shares: [0, 1] here, [2, 3] and [4, 5] on workers
    assert len(finished) == 4  # the caller's share stopped at its failure; the workers' ran to the end


def test_one_thread_is_not_a_pool():
    with pytest.raises(ValueError, match="at least 2"):
        ExpertThreads(1)


def _random_experts(E: int, D: int, I: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, I, D, generator=g).to(dtype) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g).to(dtype) / I**0.5
    return w1, w3, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "prepacked"])
def test_grouped_ffn_on_threads_equals_one_thread(threads, dtype, packed, restore_torch_threads):
    """Each expert thread runs its products on one torch thread, so the reference is one torch thread too: on an
    AVX2 machine a float32 product of 5 or 9 rows on two torch threads sums in another order than on one."""
    E, D, I = 8, 256, 512  # large enough to prepack
    torch.set_num_threads(1)
    w1, w3, w2 = _random_experts(E, D, I, dtype)
    if packed:
        w1, w3, w2 = (tuple(prepack(w) for w in ws) for ws in (w1, w3, w2))
    counts = torch.tensor([5, 0, 1, 9, 0, 3, 2, 12])  # experts with no rows among them
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1)).to(dtype)
    alone, shared = torch.empty_like(rows), torch.full_like(rows, float("nan"))
    expert_ffn_torch(rows, offsets, w1, w3, w2, alone)
    expert_ffn_torch(rows, offsets, w1, w3, w2, shared, threads)
    assert torch.equal(alone, shared)


@pytest.mark.parametrize("tokens", [1, 6])
def test_expert_stack_on_threads_equals_one_thread(threads, tokens):
    E, D, I, K = 4, 64, 96, 2
    w1, w3, w2 = _random_experts(E, D, I, torch.float32, seed=2)
    stack = ExpertStack(expert_ids=tuple(range(E)), w1=w1, w3=w3, w2=w2)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, D, generator=g)
    local_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    local_ids[0, 1] = -1  # a choice hosted elsewhere
    weights = torch.rand(tokens, K, generator=g)
    assert torch.equal(stack.run(hidden, local_ids, weights), stack.run(hidden, local_ids, weights, threads=threads))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_on_expert_threads_equals_one_thread(tiny_mixtral_dir, dtype, restore_torch_threads):
    prompts = [[1, 5, 9, 33, 2 + i, 70] for i in range(5)] + [[1, 44]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)
    torch.set_num_threads(1)  # what an engine with expert threads runs every other op on (see the grouped test)
    with LLM(tiny_mixtral_dir, dtype=dtype) as alone:
        expected = alone.generate(prompts, params)
        expected_single = alone.generate(prompts[:1], params)  # decode at batch 1: a token alone's experts
    with LLM(tiny_mixtral_dir, dtype=dtype, expert_threads=2) as shared:
        assert shared._engine.model.experts.threads.count == 2
        assert torch.get_num_threads() == 1
        got = shared.generate(prompts, params)
        single = shared.generate(prompts[:1], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.logprobs for o in got] == [o.logprobs for o in expected]
    assert single[0].token_ids == expected_single[0].token_ids and single[0].logprobs == expected_single[0].logprobs


def test_expert_threads_need_the_experts_in_process(tiny_mixtral_dir):
    with pytest.raises(ValueError, match="expert_actors = 0"):
        EngineConfig(model_dir=str(tiny_mixtral_dir), expert_threads=2, cluster={"expert_actors": 2})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        EngineConfig(model_dir=str(tiny_mixtral_dir), expert_threads=0)
