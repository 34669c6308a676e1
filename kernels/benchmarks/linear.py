"""Benchmark of the CPU projection routes: ``python -m moeshard.kernels.benchmarks.linear [MODEL_DIR]``.

1. Per call: ``F.linear`` against ``linear`` (kernels/linear.py) on the plain weight and on the weight
   prepacked for oneDNN, for the demo model's weight shapes (LM head, attention, an expert's gate/up and
   down) from 1 row to a prefill chunk, each call on another of enough weights that they do not fit in
   the CPU's cache, as in a forward pass.
2. With a model directory: greedy decode with the experts in process, ms per step at a few batch
   sizes, with plain weights (``linear``'s routes) and with prepacked weights, in each of ``--decode-dtypes``
   (float32; bfloat16 too where the CPU has it natively), the engines taking turns round by round in one
   process.
3. ``--routes``: every route forced at every shape and row count (what the bounds of ``route_for`` come
   from), and oneDNN on the prepacked weight.
4. ``--gate-up``: an expert's SwiGLU with gate and up as two products (``expert_rows_torch``) against one
   product on the two stacked into one [2I, D] weight, prepacked where this machine packs ``--dtype``.
5. ``--grouped``: a layer's experts (8, each on ``--rows`` rows of its own) one by one as ``ExpertStack``
   runs them (three products each, prepacked where this machine packs ``--dtype``) against one batched
   product per matrix over all of them (``torch.bmm`` on the [E, I, D] and [E, D, I] weights); with
   ``--threads`` 1 and 2 it also gives what a second core adds to the read rate.
6. ``--qkv``: attention's q, k and v projections (the demo model's shapes) as three products against one on
   their stacked [(H + 2*Hkv)*Dh, D] weight (what the model runs, ``LayerWeights.qkv_proj``), prepacked where
   this machine packs ``--dtype``.

Prints figures only; read the ratios, these machines are shared.

Dimensions: N rows, K in features, O out features.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F

from moeshard.kernels import linear as linear_module
from moeshard.kernels.expert_ffn import expert_rows_torch

logger = logging.getLogger(__name__)

SHAPES = {"lm_head": (49152, 576), "q/o_proj": (576, 576), "expert gate/up": (1536, 576), "expert down": (576, 1536)}
KV_PROJ = (192, 576)  # the demo model's k and v projections (3 kv heads of 64)
CACHE_BYTES = 1 << 30  # more weights than a CPU's cache holds (this project's Xeons have 480 MiB of L3)


def seconds_per_call(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], repeats: int) -> float:
    for w in weights[:4]:
        fn(w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times)


def medians_taking_turns(ways: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each way's median seconds over ``repeats`` sweeps, the ways taking turns sweep by sweep (so that the machine's
    drift falls on all of them)."""
    sweeps: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, sweep in ways.items():
            sweeps[name].append(sweep())
    return {name: statistics.median(times) for name, times in sweeps.items()}


def uncached_weights(o: int, k: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Enough [O, K] weights that, called in turn, none is still in the CPU's cache."""
    return [torch.randn(o, k).to(dtype) for _ in range(max(2, CACHE_BYTES // (o * k * dtype.itemsize)))]


def op_table(rows: list[int], repeats: int, dtype: torch.dtype) -> None:
    print("| weight [O, K] | rows | F.linear (us) | linear (us) | route | linear, prepacked (us) | speed-up, plain | speed-up, prepacked |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, (o, k) in SHAPES.items():
        weights = uncached_weights(o, k, dtype)
        packed = [linear_module.prepack(w) for w in weights]
        for n in rows:
            x = torch.randn(n, k).to(dtype)
            plain = seconds_per_call(lambda w: F.linear(x, w), weights, repeats)
            few = seconds_per_call(lambda w: linear_module.linear(x, w), weights, repeats)
            prepacked = seconds_per_call(lambda w: linear_module.linear(x, w), packed, repeats)
            route = linear_module.route_for(x, weights[0])
            print(
                f"| {name} [{o}, {k}] | {n} | {plain * 1e6:.0f} | {few * 1e6:.0f} | {route} | {prepacked * 1e6:.0f} "
                f"| {plain / few:.2f}x | {plain / prepacked:.2f}x |"
            )


def route_table(rows: list[int], repeats: int) -> None:
    """Every route forced, for setting the bounds in ``route_for``, and oneDNN on the prepacked weight: the
    routes take turns sweep by sweep (so that the machine's drift falls on all of them), the median sweep
    of each; the fastest is starred."""
    routes = ["plain", "weight_first", "onednn"] if linear_module._ONEDNN_LINEAR is not None else ["plain", "weight_first"]
    columns = routes + (["prepacked"] if linear_module._ONEDNN_LINEAR is not None else [])
    print(f"| weight [O, K] | rows | {' | '.join(f'{r} (us)' for r in columns)} | route_for |")
    print(f"|---|---:|{'---:|' * len(columns)}---|")
    for name, (o, k) in SHAPES.items():
        weights = uncached_weights(o, k)
        packed = [linear_module.prepack(w) for w in weights] if "prepacked" in columns else []
        for n in rows:
            x = torch.randn(n, k)
            ways = {r: lambda r=r: seconds_per_call(lambda w: linear_module._product(x, w, None, r), weights, 1) for r in routes}
            if packed:
                ways["prepacked"] = lambda: seconds_per_call(lambda w: linear_module.linear(x, w), packed, 1)
            medians = medians_taking_turns(ways, repeats)
            us = [medians[r] * 1e6 for r in columns]
            cells = [f"**{t:.0f}**" if t == min(us) else f"{t:.0f}" for t in us]
            print(f"| {name} [{o}, {k}] | {n} | {' | '.join(cells)} | {linear_module.route_for(x, weights[0])} |")


class StackedExpert(NamedTuple):
    w1: torch.Tensor  # [I, D] gate
    w3: torch.Tensor  # [I, D] up
    w2: torch.Tensor  # [D, I] down
    w13: torch.Tensor  # [2I, D] gate over up


def stacked_swiglu(x: torch.Tensor, expert: StackedExpert) -> torch.Tensor:
    """x [n, D] through the expert with gate and up in one product -> [n, D]."""
    gate_up = linear_module.linear(x, expert.w13)  # [n, 2I]
    half = gate_up.shape[1] // 2
    return linear_module.linear(F.silu(gate_up[:, :half]).mul_(gate_up[:, half:]), expert.w2)


def gate_up_table(rows: list[int], repeats: int, dtype: torch.dtype) -> None:
    """Two products against one stacked, over enough experts that none stays in the cache, taking turns sweep by
    sweep; the weights' bytes over the time is the read rate."""
    i, d = SHAPES["expert gate/up"]
    expert_bytes = 3 * i * d * dtype.itemsize  # w1, w3 and w2
    experts = []
    for _ in range(max(2, CACHE_BYTES // expert_bytes)):
        w1, w3, w2 = torch.randn(i, d).to(dtype), torch.randn(i, d).to(dtype), torch.randn(d, i).to(dtype)
        packed = [linear_module.prepack(w) for w in (w1, w3, w2, torch.cat([w1, w3]))]
        experts.append(StackedExpert(*packed))
    print(f"{len(experts)} experts [{i}, {d}], {dtype}, prepacked: {experts[0].w1.is_mkldnn}\n")
    print("| rows | two products (us) | one stacked (us) | speed-up | read GB/s, two | read GB/s, stacked | same output |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in rows:
        x = torch.randn(n, d).to(dtype)
        two = lambda ex: expert_rows_torch(x, ex.w1, ex.w3, ex.w2)  # noqa: E731
        stacked = lambda ex: stacked_swiglu(x, ex)  # noqa: E731
        medians = medians_taking_turns(
            {"two": lambda: seconds_per_call(two, experts, 1), "stacked": lambda: seconds_per_call(stacked, experts, 1)}, repeats
        )
        t2, t1 = medians["two"], medians["stacked"]
        same = torch.equal(two(experts[0]), stacked(experts[0]))
        print(
            f"| {n} | {t2 * 1e6:.0f} | {t1 * 1e6:.0f} | {t2 / t1:.2f}x | {expert_bytes / t2 / 1e9:.1f} "
            f"| {expert_bytes / t1 / 1e9:.1f} | {same} |"
        )


def qkv_table(rows: list[int], repeats: int, dtype: torch.dtype) -> None:
    """Three products against one on the stacked weight, over enough layers that none stays in the cache, taking
    turns sweep by sweep."""
    (q_out, d), kv_out = SHAPES["q/o_proj"], KV_PROJ[0]
    layer_bytes = (q_out + 2 * kv_out) * d * dtype.itemsize
    layers = []
    for _ in range(max(2, CACHE_BYTES // layer_bytes)):
        q, k, v = (torch.randn(o, d).to(dtype) for o in (q_out, kv_out, kv_out))
        layers.append(([linear_module.prepack(w) for w in (q, k, v)], linear_module.prepack(torch.cat([q, k, v]))))
    print(f"{len(layers)} layers' q [{q_out}, {d}], k and v [{kv_out}, {d}], {dtype}, prepacked: {layers[0][1].is_mkldnn}\n")
    print("| rows | three products (us) | one stacked (us) | speed-up | same output |")
    print("|---:|---:|---:|---:|---|")
    for n in rows:
        x = torch.randn(n, d).to(dtype)
        three = lambda layer: [linear_module.linear(x, w) for w in layer[0]]  # noqa: E731
        stacked = lambda layer: linear_module.linear(x, layer[1])  # noqa: E731
        ways = {"three": lambda: seconds_per_call(three, layers, 1), "stacked": lambda: seconds_per_call(stacked, layers, 1)}
        medians = medians_taking_turns(ways, repeats)
        t3, t1 = medians["three"], medians["stacked"]
        same = torch.equal(torch.cat(three(layers[0]), dim=1), stacked(layers[0]))
        print(f"| {n} | {t3 * 1e6:.0f} | {t1 * 1e6:.0f} | {t3 / t1:.2f}x | {same} |")


class GroupedLayer(NamedTuple):
    experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per expert: w1, w3 [I, D] and w2 [D, I], as served
    w1: torch.Tensor  # [E, I, D] gate, the same values, plain
    w3: torch.Tensor  # [E, I, D] up
    w2: torch.Tensor  # [E, D, I] down


def one_by_one(x: torch.Tensor, layer: GroupedLayer) -> torch.Tensor:
    """x [E, n, D] (expert e's rows at e) -> [E, n, D], one expert after another."""
    return torch.stack([expert_rows_torch(x[e], *weights) for e, weights in enumerate(layer.experts)])


def batched(x: torch.Tensor, layer: GroupedLayer) -> torch.Tensor:
    """x [E, n, D] -> [E, n, D], each matrix one product over all the layer's experts."""
    h = F.silu(torch.bmm(x, layer.w1.transpose(1, 2))).mul_(torch.bmm(x, layer.w3.transpose(1, 2)))  # [E, n, I]
    return torch.bmm(h, layer.w2.transpose(1, 2))  # [E, n, D]


def grouped_table(rows: list[int], repeats: int, dtype: torch.dtype, experts_per_layer: int = 8) -> None:
    """A layer's experts one by one against batched, over enough layers that none stays in the cache, taking turns
    sweep by sweep; the layer's weight bytes over the time is the read rate."""
    i, d = SHAPES["expert gate/up"]
    layer_bytes = experts_per_layer * 3 * i * d * dtype.itemsize
    layers = []
    for _ in range(max(2, CACHE_BYTES // layer_bytes)):
        w1 = (torch.randn(experts_per_layer, i, d) * d**-0.5).to(dtype)  # unit-scale outputs, as a trained model's
        w3 = (torch.randn(experts_per_layer, i, d) * d**-0.5).to(dtype)
        w2 = (torch.randn(experts_per_layer, d, i) * i**-0.5).to(dtype)
        served = [tuple(linear_module.prepack(w[e]) for w in (w1, w3, w2)) for e in range(experts_per_layer)]
        layers.append(GroupedLayer(served, w1, w3, w2))
    prepacked = layers[0].experts[0][0].is_mkldnn
    print(f"{len(layers)} layers of {experts_per_layer} experts [{i}, {d}], {dtype}, prepacked: {prepacked}\n")
    print("| rows per expert | one by one (ms a layer) | batched (ms a layer) | speed-up | read GB/s, one by one "
          "| read GB/s, batched | max difference / max output |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in rows:
        x = torch.randn(experts_per_layer, n, d).to(dtype)
        ways = {
            "one by one": lambda: seconds_per_call(lambda layer: one_by_one(x, layer), layers, 1),
            "batched": lambda: seconds_per_call(lambda layer: batched(x, layer), layers, 1),
        }
        medians = medians_taking_turns(ways, repeats)
        t1, tb = medians["one by one"], medians["batched"]
        reference = one_by_one(x, layers[0]).float()  # [E, n, D]
        difference = ((reference - batched(x, layers[0]).float()).abs().max() / reference.abs().max()).item()
        print(
            f"| {n} | {t1 * 1e3:.2f} | {tb * 1e3:.2f} | {t1 / tb:.2f}x | {layer_bytes / t1 / 1e9:.1f} "
            f"| {layer_bytes / tb / 1e9:.1f} | {difference:.2g} |"
        )


class EngineVariant(NamedTuple):
    name: str
    dtype: str
    prepack: str  # MOESHARD_PREPACK at load


def decode_table(model_dir: str, batches: list[int], tokens: int, rounds: int, dtypes: list[str]) -> None:
    """ms per decode step of each variant (every dtype, plain and prepacked), the engines taking turns; speed-ups
    against the first variant, and how many outputs each prepacked engine shares with the plain one of its dtype."""
    from moeshard.cluster import LLM, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    variants = [EngineVariant(f"{d} {kind}", d, flag) for d in dtypes for kind, flag in (("plain", "0"), ("prepacked", "1"))]
    engines = {}
    for variant in variants:
        with mock.patch.dict(os.environ, {linear_module.PREPACK_ENV_VAR: variant.prepack}):  # read at load
            engines[variant.name] = LLM(model_dir, dtype=variant.dtype, enable_prefix_caching=False)
    first = variants[0].name
    header = [f"{v.name} ms/step" for v in variants] + [f"{v.name} vs {first}" for v in variants[1:]]
    header += [f"same tokens, {d}" for d in dtypes]
    print(f"| sequences | {' | '.join(header)} |")
    print(f"|---:|{'---:|' * len(header)}")
    try:
        for batch in batches:
            prompts = [f"Question {i}: what is the capital of France?" for i in range(batch)]
            times: dict[str, list[float]] = {name: [] for name in engines}
            outputs = {}
            for _ in range(rounds + 1):  # the first round warms up
                for name, llm in engines.items():
                    start = time.perf_counter()
                    outputs[name] = [o.token_ids for o in llm.generate(prompts, params)]
                    times[name].append((time.perf_counter() - start) * 1e3 / tokens)
            ms = {name: statistics.median(t[1:]) for name, t in times.items()}
            cells = [f"{ms[v.name]:.1f}" for v in variants] + [f"{ms[first] / ms[v.name]:.2f}x" for v in variants[1:]]
            for d in dtypes:
                same = sum(a == b for a, b in zip(outputs[f"{d} plain"], outputs[f"{d} prepacked"]))
                cells.append(f"{same}/{batch}")
            print(f"| {batch} | {' | '.join(cells)} |")
    finally:
        for llm in engines.values():
            llm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="also time greedy decode of this model in process")
    parser.add_argument("--rows", default="1,2,4,8,16,32,256")
    parser.add_argument("--batches", default="1,4,16,32,64")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (Ray's workers run with 1)")
    parser.add_argument("--routes", action="store_true", help="time every route at every shape and row count instead")
    parser.add_argument("--gate-up", action="store_true", help="time an expert's gate and up as one stacked product instead")
    parser.add_argument("--grouped", action="store_true", help="time a layer's experts one by one against batched instead")
    parser.add_argument("--qkv", action="store_true", help="time q, k and v as three products against one stacked instead")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the per-call tables")
    parser.add_argument("--decode-dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = [int(r) for r in args.rows.split(",")]
    if args.routes:
        route_table(rows, args.repeats)
        return
    if args.gate_up:
        gate_up_table(rows, args.repeats, getattr(torch, args.dtype))
        return
    if args.grouped:
        grouped_table(rows, args.repeats, getattr(torch, args.dtype))
        return
    if args.qkv:
        qkv_table(rows, args.repeats, getattr(torch, args.dtype))
        return
    op_table(rows, args.repeats, getattr(torch, args.dtype))
    if args.model_dir:
        print()
        batches = [int(b) for b in args.batches.split(",")]
        decode_table(args.model_dir, batches, args.tokens, args.rounds, args.decode_dtypes.split(","))


if __name__ == "__main__":
    main()
