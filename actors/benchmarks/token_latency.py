"""Batch-1 decode time per token: the experts in process against the experts on actors (not a test).

    python -m moeshard.actors.benchmarks.token_latency [MODEL_DIR] [--expert-actors 2] [--redundant-experts 0]
        [--dtype auto] [--new-tokens 24] [--rounds 8]

One sequence decodes greedily, ``--new-tokens`` tokens, with two ``LLM``s up side by side: the experts
in this process and the experts on ``--expert-actors`` actors (``--transport``). They take turns, a new
prompt every round, so a slower spell of the machine falls on both; each round times the decode alone
(the run minus a 2-token run of the same prompt, its prefill) and the table gives the medians and the
median of the rounds' ratios, the figure the 1.5x target is read from. Without MODEL_DIR a synthetic
Mixtral (8 layers, hidden 512, 8 experts top-2, float32) is written to a temporary directory. Every
round's tokens are checked equal between the two.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.choices import DTYPE_CHOICES, TRANSPORTS
from moeshard.cluster.loadtest.loadgen import synthetic_prompt
from moeshard.cluster.loadtest.serving_bench import write_synthetic_mixtral

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 2  # the short run whose time is taken off: prefill and the first token


class DecodeTime(NamedTuple):
    ms_per_token: float
    token_ids: list[int]


def _decode_ms_per_token(llm: LLM, prompt: str, new_tokens: int) -> DecodeTime:
    """Milliseconds per decoded token of ``prompt`` (prefill subtracted), and the tokens."""
    full = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=PREFILL_TOKENS, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    tokens = llm.generate([prompt], full)[0].token_ids
    whole = time.perf_counter() - started
    started = time.perf_counter()
    llm.generate([prompt], short)
    prefill = time.perf_counter() - started
    return DecodeTime(1000 * (whole - prefill) / (new_tokens - PREFILL_TOKENS), tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.actors.benchmarks.token_latency", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", nargs="?", help="a model directory (default: a synthetic Mixtral)")
    parser.add_argument("--expert-actors", type=int, default=2)
    parser.add_argument("--transport", choices=TRANSPORTS, default="socket")
    parser.add_argument(
        "--redundant-experts", type=int, default=0, help="spare expert slots per layer (E of them: every expert on 2 actors)"
    )
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="both LLMs' dtype (auto: float32 on the CPU)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    if args.new_tokens <= PREFILL_TOKENS:
        parser.error(f"--new-tokens must be more than {PREFILL_TOKENS}")
    logging.basicConfig(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="moeshard-bench") as tmp:
        model_dir = args.model_dir or write_synthetic_mixtral(Path(tmp) / "model", num_hidden_layers=8)
        rng = random.Random(0)
        in_process, on_actors, ratios = [], [], []
        with (
            LLM(model_dir, dtype=args.dtype) as local,
            LLM(
                model_dir,
                dtype=args.dtype,
                expert_actors=args.expert_actors,
                cluster={"transport": args.transport, "redundant_experts": args.redundant_experts},
            ) as cluster,
        ):
            for llm in (local, cluster):  # warm-up
                llm.generate(["warm-up"], SamplingParams(max_tokens=PREFILL_TOKENS + 2, temperature=0, ignore_eos=True))
            for _ in range(args.rounds):
                prompt = synthetic_prompt(rng, 32)
                alone = _decode_ms_per_token(local, prompt, args.new_tokens)
                sharded = _decode_ms_per_token(cluster, prompt, args.new_tokens)
                if sharded.token_ids != alone.token_ids:
                    raise AssertionError("the expert actors decoded other tokens than the in-process experts")
                in_process.append(alone.ms_per_token)
                on_actors.append(sharded.ms_per_token)
                ratios.append(sharded.ms_per_token / alone.ms_per_token)
    print(
        f"batch-1 decode, {args.new_tokens} new tokens, {args.rounds} rounds, dtype {args.dtype}, "
        f"{Path(model_dir).name if args.model_dir else 'synthetic Mixtral'}:"
    )
    print()
    print("| configuration | ms per token (median) | rounds (ms) |")
    print("|---|---:|---|")
    print(f"| experts in process | {statistics.median(in_process):.0f} | {' '.join(f'{x:.0f}' for x in in_process)} |")
    spare = f", {args.redundant_experts} redundant experts" if args.redundant_experts else ""
    actors = f"{args.expert_actors} expert actors ({args.transport}{spare})"
    print(f"| {actors} | {statistics.median(on_actors):.0f} | {' '.join(f'{x:.0f}' for x in on_actors)} |")
    print()
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(
        f"per-round ratio, actors / in process: median {statistics.median(ratios):.2f}x (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
