"""Benchmark of the expert-sharded data path (not a test): ``python -m moeshard.actors.bench``.

1. Dispatch round trip of one MoE layer (route -> plan -> permute by actor ->
   messages -> expert actors -> replies -> combine), timed inside a
   coordinator-like actor, per transport, at several token counts; next to
   the same experts computed in-process (compute alone) and to a memcpy
   floor: the request and reply bytes copied into and out of shared memory
   once each, which any shared-memory transport must at least do.
2. End-to-end decode throughput of ``LLM(expert_actors=4)`` over the
   single-process ``LLM`` on the same model and batch, per transport.

Everything runs in one process tree, one run: compare ratios, not seconds.
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

from moeshard.actors.coordinator import remote_experts
from moeshard.actors.dispatch import plan_dispatch
from moeshard.actors.expert_pool import start_expert_pool
from moeshard.cluster.checkpoint import CheckpointReader
from moeshard.cluster.config import EngineConfig, ModelConfig
from moeshard.cluster.llm import LLM
from moeshard.cluster.moe import LocalExperts
from moeshard.cluster.sampling import SamplingParams
from moeshard.cluster.synthetic_model import write_synthetic_mixtral
from moeshard.kernels import route

logger = logging.getLogger(__name__)

TRANSPORTS = ("actor_calls", "compiled_graph")


class DispatchBench:
    """Times one MoE layer through the expert actors, the way the coordinator runs it."""

    def __init__(self, config: EngineConfig, placement, actors):
        self.config = config
        model_config = ModelConfig.from_model_dir(config.model_dir)
        reader = CheckpointReader(config.model_dir, model_config)
        self.dtype = getattr(torch, config.dtype)
        self.k = model_config.experts_per_token
        self.router = reader.read_dense(self.dtype).layers[0].router  # [E, D]
        self.hidden_size = model_config.hidden_size
        self.local = LocalExperts.from_checkpoint(reader, self.dtype)
        self.remote = remote_experts(config, placement, actors)

    def _inputs(self, num_tokens: int):
        generator = torch.Generator().manual_seed(num_tokens)
        hidden = torch.randn(num_tokens, self.hidden_size, generator=generator).to(self.dtype)  # [T, D]
        return hidden, route(hidden @ self.router.T, self.k)

    def time_layer(self, where: str, num_tokens: int, iterations: int) -> list[float]:
        experts = self.remote if where == "remote" else self.local
        hidden, routing = self._inputs(num_tokens)
        for _ in range(max(3, iterations // 10)):
            experts(0, hidden, routing)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            experts(0, hidden, routing)
            times.append(time.perf_counter() - start)
        return times

    def time_memcpy_floor(self, num_tokens: int, iterations: int) -> list[float]:
        """Copy the layer's request and reply rows into and out of a buffer, once each."""
        hidden, routing = self._inputs(num_tokens)
        plan = plan_dispatch(self.remote.tables[0], routing.expert_ids.long())
        rows_sent = int((plan.send_to >= 0).sum())  # (token, actor) pairs
        nbytes = 2 * rows_sent * self.hidden_size * hidden.element_size()  # requests + replies
        source, staging, sink = (torch.empty(nbytes, dtype=torch.uint8) for _ in range(3))
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            staging.copy_(source)
            sink.copy_(staging)
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        self.remote.transport.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_dispatch(model_dir: str, token_counts: list[int], iterations: int, num_actors: int) -> list[dict]:
    base = EngineConfig(model_dir=model_dir, dtype="bfloat16", cluster={"expert_actors": num_actors})
    pool = start_expert_pool(base, ModelConfig.from_model_dir(model_dir))
    rows: list[dict] = []
    try:
        for transport in TRANSPORTS:
            config = base.model_copy(update={"cluster": base.cluster.model_copy(update={"transport": transport})})
            bench = ray.remote(DispatchBench).options(num_cpus=1).remote(config, pool.placement, pool.actors)
            for tokens in token_counts:
                remote = ray.get(bench.time_layer.remote("remote", tokens, iterations))
                local = ray.get(bench.time_layer.remote("local", tokens, iterations))
                floor = ray.get(bench.time_memcpy_floor.remote(tokens, iterations))
                rows.append(
                    {
                        "transport": transport,
                        "tokens": tokens,
                        "p50_ms": 1e3 * statistics.median(remote),
                        "p99_ms": 1e3 * _percentile(remote, 0.99),
                        "compute_p50_ms": 1e3 * statistics.median(local),
                        "memcpy_floor_p50_ms": 1e3 * statistics.median(floor),
                    }
                )
                print(_dispatch_row(rows[-1]), flush=True)
            ray.get(bench.close.remote())
            ray.kill(bench)
    finally:
        pool.shutdown()
    return rows


def bench_decode(model_dir: str, batch: int, prompt_len: int, new_tokens: int, num_actors: int) -> list[dict]:
    prompts = [[1 + (p * 31 + i * 7) % 500 for i in range(prompt_len)] for p in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    results = []
    setups = [("single process", 0, "actor_calls")] + [(f"{num_actors} actors, {t}", num_actors, t) for t in TRANSPORTS]
    for name, actors, transport in setups:
        with LLM(model_dir, expert_actors=actors, dtype="bfloat16", cluster={"transport": transport}) as llm:
            llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm up
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outputs)
        results.append({"setup": name, "tokens_per_s": tokens / elapsed})
        print(f"{name:<32} {tokens / elapsed:10.1f} tok/s", flush=True)
    single = results[0]["tokens_per_s"]
    for row in results:
        row["ratio_to_single_process"] = row["tokens_per_s"] / single
    return results


def _dispatch_row(r: dict) -> str:
    return (
        f"| {r['transport']:<14} | {r['tokens']:>6} | {r['p50_ms']:8.2f} | {r['p99_ms']:8.2f} | "
        f"{r['compute_p50_ms']:10.2f} | {r['memcpy_floor_p50_ms']:8.3f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256], help="tokens per MoE layer")
    parser.add_argument("--iterations", type=int, default=50, help="timed round trips per point")
    parser.add_argument("--actors", type=int, default=4, help="expert actors")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size of the dispatch benchmark")
    parser.add_argument("--skip-decode", action="store_true", help="only the dispatch round trip")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeshard-bench-"))
    ray.init(num_cpus=max(os.cpu_count() or 1, args.actors + 3), include_dashboard=False, logging_level=logging.WARNING)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        layer_model = write_synthetic_mixtral(
            f"{tmp}/layer", hidden_size=args.hidden, intermediate_size=512, num_layers=1, num_heads=32, num_kv_heads=8
        )
        print(f"\nOne MoE layer, hidden {args.hidden} bf16, top-2 of 8 experts, {args.actors} expert actors (ms)")
        print("| transport      | tokens |      p50 |      p99 | compute p50 | memcpy floor |")
        print("|---|---:|---:|---:|---:|---:|")
        results["dispatch"] = bench_dispatch(str(layer_model), args.tokens, args.iterations, args.actors)
        if not args.skip_decode:
            decode_model = write_synthetic_mixtral(
                f"{tmp}/decode", hidden_size=1024, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2
            )
            print("\nDecode: 8 prompts x 16 tokens, 32 greedy tokens each, hidden 1024, 4 layers, bf16")
            results["decode"] = bench_decode(str(decode_model), batch=8, prompt_len=16, new_tokens=32, num_actors=args.actors)
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
