"""Ping-pong micro-batches: with remote experts a large step runs as two interleaved halves, and nothing changes."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest
import torch

from moeshard.cluster import SamplingParams
from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.generation import generate_to_completion
from moeshard.cluster.model.batch import SequenceChunk, StepBatch
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.moe import LocalExperts

PROMPTS = [[1, 5, 9, 33, 17, 2, 64], [1, 100], [1, 7, 7, 7, 7, 64, 12, 90, 4, 3, 3, 9, 11], [1, 8], [1, 9, 9, 9], [1, 2, 3]]


class RecordingExperts:
    """Local experts that log when each layer's experts are started and waited for, as remote ones would be."""

    def __init__(self, local: LocalExperts):
        self.local = local
        self.log: list[tuple[str, int, int]] = []  # (event, layer, tokens)
        self.passes: list[tuple[int, int]] = []  # (first, last + 1) entry of the log inside each forward pass
        self.chosen: list[tuple[int, torch.Tensor]] = []  # (layer, expert ids [t, K]) of every submit

    def submit(self, layer, hidden, routing):
        self.log.append(("submit", layer, hidden.shape[0]))
        self.chosen.append((layer, routing.expert_ids.clone()))
        out = self.local(layer, hidden, routing)
        log = self.log

        class Pending:
            def wait(self):
                log.append(("wait", layer, hidden.shape[0]))
                return out

        return Pending()

    def __call__(self, layer, hidden, routing):
        return self.submit(layer, hidden, routing).wait()

    @contextmanager
    def forward_pass(self):
        start = len(self.log)
        yield
        self.passes.append((start, len(self.log)))


def _engine(model_dir, min_sequences: int):
    config = EngineConfig(model_dir=str(model_dir), ping_pong_min_sequences=min_sequences, enable_prefix_caching=False)
    files = read_model_files(model_dir)
    experts = RecordingExperts(LocalExperts.from_checkpoint(CheckpointReader(config.model_dir, files.model_config), torch.float32))
    return build_engine(config, files, experts), experts


def test_split_in_two_keeps_whole_sequences_in_order():
    chunks = [(SequenceChunk(i, 0, n), list(range(n))) for i, n in enumerate([5, 1, 1, 6, 1])]
    batch = StepBatch.build(chunks)
    first, second = batch.split_in_two()
    assert [c.seq_id for c in first.chunks] == [0, 1, 2] and [c.seq_id for c in second.chunks] == [3, 4]
    assert torch.equal(torch.cat([first.token_ids, second.token_ids]), batch.token_ids)
    assert torch.equal(torch.cat([first.positions, second.positions]), batch.positions)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)])
def test_two_interleaved_micro_batches_change_no_output(tiny_mixtral_dir, params):
    whole, whole_experts = _engine(tiny_mixtral_dir, 0)
    split, split_experts = _engine(tiny_mixtral_dir, 2)
    expected = generate_to_completion(whole, None, PROMPTS, [params] * len(PROMPTS))
    got = generate_to_completion(split, None, PROMPTS, [params] * len(PROMPTS))
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for ours, theirs in zip(got, expected):
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(ours.logprobs, theirs.logprobs))
    whole_log, split_log = whole_experts.log, split_experts.log
    # Without ping-pong every submit is waited for at once; with it, the other half's submit comes in between.
    assert all(whole_log[i][0] == "submit" and whole_log[i + 1][0] == "wait" for i in range(0, len(whole_log), 2))
    between = [i for i in range(len(split_log) - 1) if split_log[i][0] == "submit" and split_log[i + 1][0] == "submit"]
    assert between and len(split_log) > len(whole_log)
    layers = [(event, layer) for event, layer, _ in split_log[:6]]
    assert layers == [("submit", 0), ("submit", 0), ("wait", 0), ("submit", 1), ("wait", 0), ("submit", 1)]
    # One forward pass per step, both halves inside it: every submit and its wait fall in the same pass.
    for experts in (whole_experts, split_experts):
        starts, ends = [a for a, _ in experts.passes], [b for _, b in experts.passes]
        assert starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == len(experts.log)
        for a, b in experts.passes:
            events = [event for event, _, _ in experts.log[a:b]]
            assert events.count("submit") == events.count("wait") > 0


@pytest.mark.parametrize("min_sequences", [0, 2], ids=["one-batch", "ping-pong"])
def test_the_load_counters_count_every_choice_the_experts_were_sent(tiny_mixtral_dir, min_sequences):
    """The model counts a pass's routed choices once its layers are done (a few ops a pass): the [L, E] counters
    metrics and rebalancing read equal the choices the experts saw, with or without micro-batches."""
    engine, experts = _engine(tiny_mixtral_dir, min_sequences)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    generate_to_completion(engine, None, PROMPTS, [params] * len(PROMPTS))
    load = engine.model.expert_load  # [L, E]
    want = torch.zeros_like(load)
    for layer, ids in experts.chosen:
        want[layer] += torch.bincount(ids.reshape(-1).long(), minlength=load.shape[1])
    assert torch.equal(load, want)
    tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (params.max_tokens - 1)  # every prompt token, every fed token
    assert load.sum(dim=1).tolist() == [tokens * engine.model.config.experts_per_token] * load.shape[0]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the benchmark reads /proc")
def test_the_benchmarks_cpu_accounting_sees_this_process_work():
    """``ping_pong``'s second table: the CPU seconds of the process running the model, and the idle share."""
    from moeshard.actors.benchmarks.ping_pong import _cpu_by_role, _idle_ticks

    cpu_before, ticks_before = _cpu_by_role(), _idle_ticks()
    started = time.process_time()
    while time.process_time() - started < 0.3:  # busy in this process
        pass
    cpu_after, ticks_after = _cpu_by_role(), _idle_ticks()
    assert 0.15 <= cpu_after["model"] - cpu_before["model"] <= 5.0
    assert cpu_after["experts"] >= cpu_before["experts"] >= 0.0
    assert 0 <= ticks_after[0] - ticks_before[0] <= ticks_after[1] - ticks_before[1]
