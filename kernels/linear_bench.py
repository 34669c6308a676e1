"""Benchmark of the few-row projection path: ``python -m moeshard.kernels.linear_bench [MODEL_DIR]``.

1. Per call: ``F.linear`` against ``linear`` (kernels/linear.py) for the demo model's weight shapes
   (LM head, attention, an expert's gate/up and down) at 1-8 rows, each call on another of enough
   weights that they do not fit in the CPU's cache, as in a forward pass.
2. With a model directory: greedy decode with the experts in process, ms per token at a few batch
   sizes, the path on and off (``SMALL_ROWS = 0``), taking turns round by round in one process.

Prints figures only; read the ratios, these machines are shared.

Dimensions: N rows, K in features, O out features.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeshard.kernels import linear as linear_module

logger = logging.getLogger(__name__)

SHAPES = {"lm_head": (49152, 576), "q/o_proj": (576, 576), "expert gate/up": (1536, 576), "expert down": (576, 1536)}
CACHE_BYTES = 256 << 20  # more weights than any CPU cache holds


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


def op_table(rows: list[int], repeats: int) -> None:
    print("| weight [O, K] | rows | F.linear (us) | linear (us) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, (o, k) in SHAPES.items():
        weights = [torch.randn(o, k) for _ in range(max(2, CACHE_BYTES // (o * k * 4)))]
        for n in rows:
            x = torch.randn(n, k)
            plain = seconds_per_call(lambda w: F.linear(x, w), weights, repeats)
            few = seconds_per_call(lambda w: linear_module.linear(x, w), weights, repeats)
            print(f"| {name} [{o}, {k}] | {n} | {plain * 1e6:.0f} | {few * 1e6:.0f} | {plain / few:.2f}x |")


def decode_table(model_dir: str, batches: list[int], tokens: int, rounds: int) -> None:
    from moeshard.cluster import LLM, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    small_rows = linear_module.SMALL_ROWS
    with LLM(model_dir) as llm:
        print("| sequences | plain ms/token | few-row path ms/token | speed-up | same tokens |")
        print("|---:|---:|---:|---:|---:|")
        for batch in batches:
            prompts = [f"Question {i}: what is the capital of France?" for i in range(batch)]
            times: dict[int, list[float]] = {0: [], small_rows: []}
            outputs = {}
            for _ in range(rounds + 1):  # the first round warms up
                for setting in (0, small_rows):
                    linear_module.SMALL_ROWS = setting
                    start = time.perf_counter()
                    outputs[setting] = [o.token_ids for o in llm.generate(prompts, params)]
                    times[setting].append((time.perf_counter() - start) * 1e3 / tokens)
            linear_module.SMALL_ROWS = small_rows
            plain, few = (statistics.median(times[s][1:]) for s in (0, small_rows))
            same = sum(a == b for a, b in zip(outputs[0], outputs[small_rows]))
            print(f"| {batch} | {plain:.1f} | {few:.1f} | {plain / few:.2f}x | {same}/{batch} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="also time greedy decode of this model in process")
    parser.add_argument("--rows", default="1,2,3,4,8")
    parser.add_argument("--batches", default="1,2,4,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    op_table([int(r) for r in args.rows.split(",")], args.repeats)
    if args.model_dir:
        print()
        decode_table(args.model_dir, [int(b) for b in args.batches.split(",")], args.tokens, args.rounds)


if __name__ == "__main__":
    main()
