"""Repetition rates of live traffic (``/v1/experts``' routing): the sliding window, the engine, the server.

The oracle for the engine and the server is transformers' router logits over each request's computed
tokens (the prompt and every generated token but the last, which is sampled and never run), with the
pairs counted here in plain Python.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
import transformers

from moeshard.cluster.analysis.live_window import LiveRoutingWindow, attach_live_window
from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.generation import generate_to_completion
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.model.batch import SequenceChunk, StepBatch

PROMPTS = [[1, 5, 9, 33, 17, 80, 2, 64, 12], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4, 33, 33]]


def flags(a: list[int], b: list[int]) -> tuple[bool, bool]:
    return a[0] == b[0], bool(set(a) & set(b))


def rates(pairs: list[tuple[bool, bool]]) -> tuple[float, float]:
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


# -- the window over synthetic steps ------------------------------------------------------------------------


def run_steps(window: LiveRoutingWindow, steps, routes, layers):
    """Feed ``steps`` ([[(seq, start, n), ...], ...]) with each sequence's expert ids ``routes[seq][layer][pos]``."""
    for step in steps:
        chunks = [(SequenceChunk(seq, start, n), [0] * n) for seq, start, n in step]
        batch = StepBatch.build(chunks)
        ids = torch.tensor(
            [[routes[seq][layer][p] for seq, start, n in step for p in range(start, start + n)] for layer in layers]
        )  # [L, T, K]
        window(batch, ids)


def reference_pairs(steps, routes, layer, forgotten_at=None) -> list[tuple[bool, bool]]:
    """Pairs (p - 1, p) in the order the steps route them; a chunk's first token pairs with the last one seen."""
    seen: dict[int, int] = {}
    pairs = []
    for i, step in enumerate(steps):
        for seq in (forgotten_at or {}).get(i, ()):
            seen.pop(seq, None)
        for seq, start, n in step:
            for p in range(start, start + n):
                if p > 0 and seen.get(seq) == p - 1:
                    pairs.append(flags(routes[seq][layer][p - 1], routes[seq][layer][p]))
                seen[seq] = p
    return pairs


@pytest.fixture
def synthetic():
    gen = torch.Generator().manual_seed(0)
    layers = (1, 3)
    def random_route() -> list[list[int]]:  # 12 positions, 2 distinct experts of 6 each
        return [torch.randperm(6, generator=gen)[:2].tolist() for _ in range(12)]

    routes = {seq: {layer: random_route() for layer in layers} for seq in (10, 11, 12)}
    steps = [
        [(10, 0, 5), (11, 0, 3)],  # two prefill chunks
        [(11, 3, 1), (10, 5, 4)],  # a decode and a prefill's next chunk
        [(10, 9, 1), (11, 4, 1), (12, 0, 6)],
        [(12, 6, 1), (10, 10, 1)],  # 11 has finished
        [(12, 7, 1), (10, 11, 1)],
    ]
    return layers, routes, steps


def test_window_counts_pairs_across_chunks_and_steps(synthetic):
    layers, routes, steps = synthetic
    window = LiveRoutingWindow(layers, 6, 2, window=1000)
    run_steps(window, steps, routes, layers)
    snapshot = window.snapshot()
    assert [entry.layer for entry in snapshot.layers] == list(layers)
    for entry in snapshot.layers:
        pairs = reference_pairs(steps, routes, entry.layer)
        assert snapshot.window_tokens == len(pairs) == (12 - 1) + (5 - 1) + (8 - 1)
        assert (entry.same_top1, entry.shared_any) == pytest.approx(rates(pairs))
    assert snapshot.random_baseline.same_top1 == pytest.approx(1 / 6)
    assert snapshot.random_baseline.shared_any == pytest.approx(1 - 6 / 15)  # 1 - C(4, 2) / C(6, 2)


@pytest.mark.parametrize("size", [1, 4, 9])
def test_window_keeps_only_the_last_pairs(synthetic, size):
    layers, routes, steps = synthetic
    window = LiveRoutingWindow(layers, 6, 2, window=size)
    run_steps(window, steps, routes, layers)
    snapshot = window.snapshot()
    assert snapshot.window_tokens == size
    for entry in snapshot.layers:
        assert (entry.same_top1, entry.shared_any) == pytest.approx(rates(reference_pairs(steps, routes, entry.layer)[-size:]))


def test_window_forgets_sequences_no_longer_running(synthetic):
    layers, routes, steps = synthetic
    running: set[int] = set()
    window = LiveRoutingWindow(layers, 6, 2, window=1000, live_sequences=lambda: running)
    for i, step in enumerate(steps):
        running = {seq for seq, _, _ in step}
        run_steps(window, [step], routes, layers)
        assert set(window.last) == running
    # A bound on remembered sequences: past it the least recently seen goes, and its next chunk starts no pair.
    bounded = LiveRoutingWindow(layers, 6, 2, window=1000, max_sequences=1)
    run_steps(bounded, steps, routes, layers)
    assert len(bounded.last) <= 2  # trimmed to the bound as each step starts; a step may add more
    most_recent = {i: steps[i - 1][-1][0] for i in range(1, len(steps))}  # the previous step's last chunk's sequence
    forgotten = {i: {10, 11, 12} - {seq} for i, seq in most_recent.items()}
    for entry in bounded.snapshot().layers:
        assert (entry.same_top1, entry.shared_any) == pytest.approx(rates(reference_pairs(steps, routes, entry.layer, forgotten)))


# -- the engine against transformers -------------------------------------------------------------------------


def hf_pairs(reference, sequences: list[list[int]]) -> dict[int, list[tuple[bool, bool]]]:
    """{MoE layer: flags of every consecutive pair of every sequence}, from transformers' router logits."""
    k = reference.config.num_experts_per_tok
    out: dict[int, list[tuple[bool, bool]]] = {}
    for ids in sequences:
        with torch.no_grad():
            logits = reference(torch.tensor([ids]), output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):  # every Mixtral layer is an MoE layer
            top = torch.topk(torch.softmax(layer_logits.float(), dim=-1), k, dim=-1).indices.tolist()  # [T, K]
            out.setdefault(layer, []).extend(flags(a, b) for a, b in zip(top, top[1:]))
    return out


@pytest.fixture(scope="module")
def live_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("routing_live", seed=9, with_tokenizer=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def reference(live_dir):
    return transformers.MixtralForCausalLM.from_pretrained(live_dir, dtype=torch.float32, experts_implementation="eager").eval()


def test_engine_window_matches_transformers(live_dir, reference):
    engine = build_engine(EngineConfig(model_dir=str(live_dir), max_batch_tokens=5), read_model_files(live_dir))
    window = attach_live_window(engine)
    outputs = generate_to_completion(engine, None, PROMPTS, [SamplingParams(6, temperature=0, ignore_eos=True)] * len(PROMPTS))
    computed = [out.prompt_token_ids + out.token_ids[:-1] for out in outputs]
    expected = hf_pairs(reference, computed)
    snapshot = window.snapshot()
    assert snapshot.window_tokens == sum(len(ids) - 1 for ids in computed)
    assert [entry.layer for entry in snapshot.layers] == sorted(expected)
    for entry in snapshot.layers:
        assert (entry.same_top1, entry.shared_any) == pytest.approx(rates(expected[entry.layer]), abs=1e-12)
    # Finished sequences are forgotten at the next step: after one more request only that one is remembered.
    assert len(window.last) >= 1
    generate_to_completion(engine, None, [[1, 2, 3]], [SamplingParams(2, temperature=0)])
    assert len(window.last) == 1


@pytest.mark.slow
def test_server_reports_the_window_in_v1_experts(live_dir, reference, live_server):
    from moeshard.cluster import LLM
    from moeshard.cluster.client import Client

    args = {"model_dir": str(live_dir), "model_name": "tiny", "routing_window": 10_000, "engine": {"max_batch_tokens": 4}}
    with LLM(live_dir) as llm:
        generated = [out.token_ids for out in llm.generate(PROMPTS, SamplingParams(5, temperature=0, ignore_eos=True))]
    with live_server({"/": args}) as url:
        before = Client(f"{url}/v1", max_retries=0).experts().routing
        assert before.window_tokens == 0 and all(entry.same_top1 is None for entry in before.layers)
        for prompt in PROMPTS:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
            urllib.request.urlopen(request, timeout=120).read()
        with Client(f"{url}/v1", max_retries=0) as client:
            routing = client.experts().routing
    computed = [prompt + ids[:-1] for prompt, ids in zip(PROMPTS, generated)]
    expected = hf_pairs(reference, computed)
    assert routing.window_tokens == sum(len(ids) - 1 for ids in computed)
    assert routing.random_baseline.shared_any == pytest.approx(1 - 15 / 28)
    for entry in routing.layers:
        assert (entry.same_top1, entry.shared_any) == pytest.approx(rates(expected[entry.layer]), abs=1e-12)
