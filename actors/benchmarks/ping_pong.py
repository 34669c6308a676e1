"""Decode throughput through expert actors with and without ping-pong micro-batches (not a test).

    python -m moeshard.actors.benchmarks.ping_pong [--expert-actors 4] [--sequences 32] [--new-tokens 48]

A synthetic Mixtral (``--layers`` layers, hidden 512, 8 experts top-2, float32) decodes ``--sequences``
greedy sequences of ``--new-tokens`` tokens each: in one process (the reference), with the experts on
``--expert-actors`` actors as one batch per step, and with each step split into two micro-batches whose
attention and experts overlap (``ping_pong_min_sequences``). The three run in turn, ``--repeats`` times,
on the same prompts; the table gives the median output tokens/s and the ratios. One run, one machine:
read the ratios. Every configuration's tokens are checked equal to the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import ray

from moeshard.actors.ray_init import init_ray
from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.loadtest.serving_bench import write_synthetic_mixtral

logger = logging.getLogger(__name__)


class Timed(NamedTuple):
    seconds: float
    token_ids: list[list[int]]


def _time_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> Timed:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return Timed(time.perf_counter() - started, [o.token_ids for o in outputs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.ping_pong", description=__doc__.split("\n")[0])
    parser.add_argument("--expert-actors", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING")
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(2, 32000) for _ in range(15)] for _ in range(args.sequences)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    tokens = args.sequences * args.new_tokens
    with tempfile.TemporaryDirectory(prefix="moeshard-bench") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
        model_dir = write_synthetic_mixtral(Path(tmp) / "model", num_hidden_layers=args.layers)
        init_ray(num_cpus=args.expert_actors + 4, include_dashboard=False, logging_level="WARNING")  # room for both clusters
        runs = {"one process": [], "actors, one batch": [], "actors, ping-pong": []}
        with LLM(model_dir, enable_prefix_caching=False) as single:
            _time_generate(single, prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
            cluster = {"cpus_per_actor": 0.5}
            with LLM(model_dir, expert_actors=args.expert_actors, cluster=cluster, enable_prefix_caching=False,
                     ping_pong_min_sequences=0) as plain, \
                 LLM(model_dir, expert_actors=args.expert_actors, cluster=cluster, enable_prefix_caching=False,
                     ping_pong_min_sequences=8) as overlapped:  # fmt: skip
                for llm in (plain, overlapped):
                    _time_generate(llm, prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
                expected = None
                for _ in range(args.repeats):
                    for name, llm in zip(runs, (single, plain, overlapped)):
                        seconds, out = _time_generate(llm, prompts, params)
                        expected = expected or out
                        if out != expected:
                            raise AssertionError(f"{name}: tokens differ from the one-process run")
                        runs[name].append(tokens / seconds)
    ray.shutdown()
    base = statistics.median(runs["one process"])
    print(f"{args.sequences} sequences x {args.new_tokens} new tokens, {args.layers} layers, {args.expert_actors} expert actors:")
    print()
    print("| configuration | output tok/s (median) | vs one process |")
    print("|---|---:|---:|")
    for name, rates in runs.items():
        print(f"| {name} | {statistics.median(rates):.1f} | {statistics.median(rates) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
