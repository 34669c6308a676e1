"""Benchmark of expert rebalancing (not a test): ``python -m moeshard.actors.benchmarks.rebalance``.

Decode throughput of ``LLM(expert_actors=4)`` on a synthetic Mixtral whose routers send most tokens to
two experts, before and after ``LLM.rebalance()``, with and without redundant expert slots:

1. start the cluster (``redundant_experts`` R), decode the batch once to warm up, then again greedily,
   timed: tokens/s "before";
2. rebalance from the load measured so far (replicas of the hot experts into the R spare slots; with
   R = 0 the experts are only moved between actors);
3. decode the same batch again: tokens/s "after", and whether its greedy tokens equal the first run's
   (in bf16 they need not: an actor rounds its partial sum of a token's experts to bf16, and moving an
   expert to another actor changes that grouping; the tests check exactness in float32).

Per phase the table shows the rows the busiest actor was sent per step (over all layers), the mean
over layers of the actors' imbalance (max / mean of rows), and the rebalance's duration and bytes loaded.

Everything runs in one process tree, one run: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from moeshard.actors.ray_init import init_ray
from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral
from moeshard.cluster.engine.llm import LLM
from moeshard.cluster.engine.sampling import SamplingParams


def skew_routers(model_dir: Path, hot: dict[int, float], offset: float) -> None:
    """Send most tokens to the ``hot`` experts: every embedding gets ``offset`` in hidden dimension 0, and each
    hot expert's router row weight ``hot[e]`` on it, in every layer."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][:, 0] = offset
    for name, tensor in tensors.items():
        if name.endswith("block_sparse_moe.gate.weight"):
            for expert, weight in hot.items():
                tensor[expert, 0] = weight
    save_file(tensors, path, metadata={"format": "pt"})


def _decode(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return [o.token_ids for o in outputs], time.perf_counter() - start


def _phase(name: str, tokens: list[list[int]], seconds: float, balance: dict) -> dict:
    window = balance["window"]
    moe = [ratio for ratio in window["imbalance"] if ratio > 0]
    count = sum(len(t) for t in tokens)
    return {
        "phase": name,
        "tokens_per_s": count / seconds,
        "busiest_actor_rows_per_step": max(window["rows_per_step"]),
        "rows_per_step": window["rows_per_step"],
        "mean_imbalance": sum(moe) / max(len(moe), 1),
    }


def bench_rebalance(model_dir: str, redundant: int, num_actors: int, batch: int, new_tokens: int) -> dict:
    prompts = [[1 + (p * 31 + i * 7) % 500 for i in range(16)] for p in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    cluster = {"redundant_experts": redundant}
    with LLM(model_dir, expert_actors=num_actors, dtype="bfloat16", cluster=cluster) as llm:
        llm.generate(prompts, params)  # warm up (its load counts: the rebalance plans from both runs)
        tokens, seconds = _decode(llm, prompts, params)
        before = _phase("before", tokens, seconds, llm.expert_balance())
        report = llm.rebalance()
        after_tokens, after_seconds = _decode(llm, prompts, params)
        after = _phase("after", after_tokens, after_seconds, llm.expert_balance())
    return {
        "same_tokens": after_tokens == tokens,
        "redundant_experts": redundant,
        "phases": [before, after],
        "speedup": after["tokens_per_s"] / before["tokens_per_s"],
        "rebalance_seconds": report.seconds,
        "bytes_loaded": report.bytes_loaded,
        "moved": report.moved,
        "expected_imbalance_before": report.imbalance_before,
        "expected_imbalance_after": report.imbalance_after,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.rebalance", description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=4, help="expert actors")
    parser.add_argument("--redundant", type=int, nargs="+", default=[0, 4], help="redundant expert slots per layer")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moeshard.cluster.engine.assembly").setLevel(logging.ERROR)  # "no tokenizer": prompts are token ids

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeshard-bench-"))
    init_ray(num_cpus=2 * args.actors + 2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_synthetic_mixtral(
            f"{tmp}/skewed", hidden_size=1024, intermediate_size=3584, num_layers=4, num_heads=8, num_kv_heads=2
        )
        skew_routers(model, {0: 0.15, 1: 0.1}, offset=1.0)
        print(
            f"\nDecode with a skewed router: {args.batch} prompts x 16 tokens, {args.tokens} greedy tokens each "
            f"(ignore_eos), hidden 1024, intermediate 3584, 4 layers, top-2 of 8 experts, bf16, {args.actors} expert actors"
        )
        print("| redundant | phase  | tokens/s | busiest actor rows/step | mean imbalance | rebalance s | MB loaded | same tokens |")
        print("|---:|---|---:|---:|---:|---:|---:|---|")
        for redundant in args.redundant:
            result = bench_rebalance(str(model), redundant, args.actors, args.batch, args.tokens)
            results.append(result)
            for phase in result["phases"]:
                extra = "   - |    - |  -"
                if phase["phase"] == "after":
                    same = "yes" if result["same_tokens"] else "no"
                    extra = f"{result['rebalance_seconds']:6.2f} | {result['bytes_loaded'] / 2**20:6.1f} | {same}"
                print(
                    f"| {redundant:>9} | {phase['phase']:<6} | {phase['tokens_per_s']:8.1f} | "
                    f"{phase['busiest_actor_rows_per_step']:8.1f} | {phase['mean_imbalance']:5.2f} | {extra} |",
                    flush=True,
                )
    ray.shutdown()
    for result in results:
        print(f"redundant {result['redundant_experts']}: after / before = {result['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the coordinator, like each actor, has one thread
    main()
