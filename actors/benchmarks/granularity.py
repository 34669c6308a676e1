"""Benchmark of many small experts against few large ones (not a test): ``python -m moeshard.actors.benchmarks.granularity``.

Two layouts with equal active parameters per token (K x I equal): E = 8, K = 2
with expert hidden size ``--intermediate``, and E = 128, K = 8 with a quarter
of it (so 4x the total expert parameters).

1. Dispatch round trip of one MoE layer through the expert actors (route ->
   plan -> permute by actor -> one message per actor -> experts -> combine),
   timed inside a coordinator-like actor at several token counts, next to the
   same layer run in-process (``LocalExperts``); messages and bytes per layer.
2. Decode throughput of ``LLM(expert_actors=N)`` and of the single process,
   for each layout, on the same prompts.
3. The shared expert (Qwen2-MoE) on the coordinator: run after the actors
   answer (sequential) or while they work (overlapped, ``ExpertsFn.submit``).

Everything runs in one process tree, one run: compare ratios, not seconds.
The two layouts are measured in turn at each point, so that other load on the
machine falls on both alike.
The family changes neither dispatch nor combine, so synthetic Mixtral-layout
checkpoints stand in for both layouts.

Dimensions: T tokens, D hidden, Is shared expert hidden.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import ray
import torch

from moeshard.actors.benchmarks.dispatch import DispatchBench
from moeshard.actors.pool.expert_pool import start_expert_pool
from moeshard.actors.ray_init import init_ray
from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.llm import LLM
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.layers import swiglu

logger = logging.getLogger(__name__)


class GranularityBench(DispatchBench):
    """``DispatchBench`` plus message counts and the shared expert, sequential or overlapped."""

    def messages_per_layer(self, num_tokens: int) -> dict[str, float]:
        experts = self.remote["experts"]
        experts(0, *self._inputs(num_tokens))
        messages = [m for m in experts.transport.last[0] if m is not None]
        return {"messages": len(messages), "request_bytes": sum(len(m) for m in messages)}

    def time_shared(self, num_tokens: int, shared_size: int, iterations: int, overlap: bool) -> list[float]:
        """Seconds per layer: routed experts on the actors plus a shared expert [Is] here."""
        generator = torch.Generator().manual_seed(shared_size)
        w1, w3 = (torch.randn(shared_size, self.hidden_size, generator=generator).to(self.dtype) for _ in range(2))
        w2 = torch.randn(self.hidden_size, shared_size, generator=generator).to(self.dtype)
        experts, (hidden, routing) = self.remote["experts"], self._inputs(num_tokens)
        times = []
        for i in range(iterations + max(3, iterations // 10)):
            start = time.perf_counter()
            if overlap:
                pending = experts.submit(0, hidden, routing)
                out = swiglu(hidden, w1, w3, w2) + pending.wait()  # [T, D]
            else:
                out = experts(0, hidden, routing) + swiglu(hidden, w1, w3, w2)  # [T, D]
            times.append(time.perf_counter() - start)
        del out
        return times[-iterations:]


LAYOUTS = {"E8_K2": (8, 2, 1), "E128_K8": (128, 8, 4)}  # name -> E, K, divisor of the expert hidden size


def _ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def bench_layers(model_dirs: dict[str, str], args: argparse.Namespace) -> dict:
    """Both layouts live at once, measured in turn at each token count (so load on the machine hits both alike)."""
    pools, benches, result = {}, {}, {name: {"rows": []} for name in model_dirs}
    try:
        for name, model_dir in model_dirs.items():
            config = EngineConfig(model_dir=model_dir, dtype="bfloat16", cluster={"expert_actors": args.actors})
            pools[name] = pool = start_expert_pool(config, ModelConfig.from_model_dir(model_dir))
            bench_cls = ray.remote(GranularityBench).options(num_cpus=1)
            benches[name] = bench_cls.remote(config, pool.placement, pool.actors, pool.actors)
        for tokens in args.tokens:
            for name, bench in benches.items():
                remote = ray.get(bench.time_layer.remote("experts", tokens, args.iterations))["total"]
                local = ray.get(bench.time_layer.remote("local", tokens, args.iterations))["total"]
                sizes = ray.get(bench.messages_per_layer.remote(tokens))
                row = {"tokens": tokens, "round_trip_ms": _ms(remote), "in_process_ms": _ms(local), **sizes}
                result[name]["rows"].append(row)
        fine = benches["E128_K8"]
        for tokens in args.tokens:
            row = {"tokens": tokens}
            for _ in range(2):  # alternate, twice: the better of two per mode
                for overlap, key in ((False, "sequential_ms"), (True, "overlapped_ms")):
                    times = ray.get(fine.time_shared.remote(tokens, args.shared, args.iterations, overlap))
                    row[key] = min(row.get(key, float("inf")), _ms(times))
            result["E128_K8"].setdefault("shared", []).append(row)
    finally:
        for bench in benches.values():
            ray.kill(bench)
        for pool in pools.values():
            pool.shutdown()
    return result


def bench_decode(model_dirs: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """tokens/s per layout, single process and with expert actors; setups taken in turn, the best of two rounds."""
    prompts = [[1 + (p * 31 + i * 7) % 500 for i in range(16)] for p in range(args.decode_batch)]
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    rates: dict[str, dict[str, float]] = {name: {} for name in model_dirs}
    for _ in range(2):
        for setup, actors in (("single_process", 0), ("expert_actors", args.actors)):
            for name, model_dir in model_dirs.items():
                with LLM(model_dir, expert_actors=actors, dtype="bfloat16") as llm:
                    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm up
                    start = time.perf_counter()
                    outputs = llm.generate(prompts, params)
                    rate = sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)
                rates[name][setup] = max(rates[name].get(setup, 0.0), rate)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.granularity", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256], help="tokens per MoE layer")
    parser.add_argument("--iterations", type=int, default=30, help="timed round trips per point")
    parser.add_argument("--actors", type=int, default=2, help="expert actors")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=2048, help="expert hidden size at E=8, K=2")
    parser.add_argument("--shared", type=int, default=4096, help="shared expert hidden size")
    parser.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moeshard.cluster.engine.assembly").setLevel(logging.ERROR)  # "no tokenizer": prompts are token ids

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeshard-bench-"))
    init_ray(num_cpus=2 * (args.actors + 1), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        layer_dirs, decode_dirs = {}, {}
        for name, (experts, k, divisor) in LAYOUTS.items():
            size = dict(hidden_size=args.hidden, intermediate_size=args.intermediate // divisor, num_experts=experts, experts_per_token=k)
            layer_dirs[name] = str(write_synthetic_mixtral(f"{tmp}/{name}_layer", num_layers=1, num_heads=8, num_kv_heads=2, **size))
            decode_dirs[name] = str(write_synthetic_mixtral(f"{tmp}/{name}_decode", num_layers=4, num_heads=8, num_kv_heads=2, **size))
        results = bench_layers(layer_dirs, args)
        for name, rates in bench_decode(decode_dirs, args).items():
            results[name]["decode_tokens_per_s"] = rates
    ray.shutdown()
    _print(results, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def _print(results: dict, args: argparse.Namespace) -> None:
    coarse, fine = results["E8_K2"], results["E128_K8"]
    print(f"\nOne MoE layer, hidden {args.hidden} bf16, {args.actors} expert actors; equal active parameters (K x I)")
    print("| T | E8 K2 round trip ms | E128 K8 round trip ms | ratio | E8 in-process ms | E128 in-process ms | messages E8 / E128 | request KiB E8 / E128 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(coarse["rows"], fine["rows"]):
        print(
            f"| {a['tokens']} | {a['round_trip_ms']:.2f} | {b['round_trip_ms']:.2f} | {b['round_trip_ms'] / a['round_trip_ms']:.2f} "
            f"| {a['in_process_ms']:.2f} | {b['in_process_ms']:.2f} | {a['messages']} / {b['messages']} "
            f"| {a['request_bytes'] / 1024:.0f} / {b['request_bytes'] / 1024:.0f} |"
        )
    print(f"\nDecode, {args.decode_batch} prompts x {args.decode_tokens} tokens, 4 layers (tokens/s)")
    print("| layout | single process | expert actors | actors / single |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        single, actors = r["decode_tokens_per_s"]["single_process"], r["decode_tokens_per_s"]["expert_actors"]
        print(f"| {name} | {single:.1f} | {actors:.1f} | {actors / single:.2f} |")
    print(f"\nShared expert (Is {args.shared}) on the coordinator with E128 K8 on the actors (ms per layer)")
    print("| T | sequential | overlapped | overlapped / sequential |")
    print("|---:|---:|---:|---:|")
    for row in fine["shared"]:
        print(f"| {row['tokens']} | {row['sequential_ms']:.2f} | {row['overlapped_ms']:.2f} | {row['overlapped_ms'] / row['sequential_ms']:.2f} |")


if __name__ == "__main__":
    main()
