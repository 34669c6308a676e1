"""Prefix-caching benchmark: TTFT of a request that shares a long prefix with an earlier one, and a multi-turn chat load.

    python -m moeshard.cluster.loadtest.prefix_bench [--model-dir DIR] [--expert-actors 2] [--prefix-len 1500]

Against a live server (experts on ``--expert-actors`` actors), once with prefix caching and once without:

1. TTFT pairs: for each of ``--pairs`` fresh prefixes of about ``--prefix-len`` tokens, a cold request
   (the prefix and one question), then a warm one (the same prefix, another question). The table gives
   each median and warm / cold.
2. A multi-turn chat load (``loadgen`` with ``turns``): ``--conversations`` chats of ``--turns`` turns
   behind one shared system prompt, ``--concurrency`` at a time; TTFT p50 per turn and output tokens/s.

Both servers run in the same process one after the other, on the same model; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
from pathlib import Path

from pydantic import BaseModel

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadReport, LoadSpec, run_load, stream_one, synthetic_prompt
from moeshard.cluster.loadtest.serving_bench import (
    MODEL_NAME,
    add_model_arguments,
    benchmark_model,
    check_model_dir,
    served_model,
)
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)

QUESTIONS = ("what is the first word of this text", "how many times does the word water appear")


class PrefixRun(BaseModel):
    prefix_caching: bool
    cold_ttft_s: list[float]
    warm_ttft_s: list[float]
    chat: LoadReport

    @property
    def warm_over_cold(self) -> float:
        return statistics.median(self.warm_ttft_s) / statistics.median(self.cold_ttft_s)


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
PrefixRun.model_rebuild()


async def _measure(url: str, args: argparse.Namespace, prefix_caching: bool, seed: int = 1) -> PrefixRun:
    rng = random.Random(seed)
    cold, warm = [], []
    async with AsyncClient(url, model=MODEL_NAME, timeout=600, max_retries=0) as client:
        one_token = LoadSpec(output_len=1)
        await stream_one(client, MODEL_NAME, synthetic_prompt(rng, 64), one_token)  # warm-up
        for _ in range(args.pairs):
            prefix = synthetic_prompt(rng, args.prefix_len)
            for ttfts, question in zip((cold, warm), QUESTIONS):
                record = await stream_one(client, MODEL_NAME, f"{prefix} {question}", one_token)
                if not record.ok:
                    raise RuntimeError(f"a request failed: {record.error}")
                ttfts.append(record.ttft_s)
        chat = LoadSpec(
            requests=args.conversations,
            concurrency=args.concurrency,
            prompt_len=args.turn_len,
            output_len=args.output_len,
            shared_prefix_len=args.system_len,
            turns=args.turns,
            seed=seed,
        )
        report = await run_load(client, chat, MODEL_NAME)
    return PrefixRun(prefix_caching=prefix_caching, cold_ttft_s=cold, warm_ttft_s=warm, chat=report)


def run(model_dir: Path, args: argparse.Namespace, prefix_caching: bool) -> PrefixRun:
    with served_model(model_dir, args.expert_actors, {"enable_prefix_caching": prefix_caching}) as url:
        return asyncio.run(_measure(url, args, prefix_caching))


def format_runs(runs: list[PrefixRun], args: argparse.Namespace) -> str:
    lines = [
        f"TTFT with a shared prefix of about {args.prefix_len} tokens ({args.pairs} pairs, medians):",
        "",
        "| prefix caching | cold TTFT (ms) | warm TTFT (ms) | warm / cold |",
        "|---|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {'on' if r.prefix_caching else 'off'} | {ms(statistics.median(r.cold_ttft_s))} | "
            f"{ms(statistics.median(r.warm_ttft_s))} | {r.warm_over_cold:.2f}x |"
        )
    turns = " | ".join(f"turn {t + 1} TTFT p50 (ms)" for t in range(args.turns))
    lines += [
        "",
        f"Multi-turn chat: {args.conversations} conversations of {args.turns} turns, {args.concurrency} at a time, "
        f"a shared system prompt of about {args.system_len} tokens, {args.output_len} tokens per answer:",
        "",
        f"| prefix caching | output tok/s | {turns} |",
        "|---|---:|" + "---:|" * args.turns,
    ]
    for r in runs:
        per_turn = " | ".join(ms(t) for t in r.chat.turn_ttft_p50_s)
        lines.append(f"| {'on' if r.prefix_caching else 'off'} | {r.chat.output_throughput:.1f} | {per_turn} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.cluster.loadtest.prefix_bench",
        description="TTFT with a shared prefix and a multi-turn chat load, with and without prefix caching.",
    )
    add_model_arguments(parser)
    parser.add_argument("--prefix-len", type=int, default=1500, help="tokens of each shared prefix, about (default: 1500)")
    parser.add_argument("--pairs", type=int, default=5, help="cold/warm request pairs (default: 5)")
    parser.add_argument("--conversations", type=int, default=16, help="chats in the multi-turn load (default: 16)")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat (default: 4)")
    parser.add_argument("--concurrency", type=int, default=4, help="chats at a time (default: 4)")
    parser.add_argument("--system-len", type=int, default=500, help="tokens of the shared system prompt (default: 500)")
    parser.add_argument("--turn-len", type=int, default=48, help="tokens of each user message (default: 48)")
    parser.add_argument("--output-len", type=int, default=32, help="tokens per answer (default: 32)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    check_model_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    context = max(2048, args.prefix_len + 256, args.system_len + args.turns * (args.turn_len + args.output_len) + 256)
    with benchmark_model(args.model_dir, max_position_embeddings=context) as model_dir:
        runs = [run(model_dir, args, prefix_caching=True), run(model_dir, args, prefix_caching=False)]
    print(format_runs(runs, args))
    if args.json is not None:
        Path(args.json).write_text("[" + ",".join(r.model_dump_json(indent=2) for r in runs) + "]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
