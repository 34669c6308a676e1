"""M:N benchmark: throughput with 1 and 2 coordinators over one pool of expert actors.

    python -m moeshard.cluster.loadtest.coordinator_bench [--model-dir DIR] [--expert-actors 2] [--coordinators 1,2]

For each coordinator count, a server (Serve replicas over one shared expert pool) on the same checkpoint,
loaded by the load generator at ``--concurrency`` clients (closed loop); the table gives output tokens/s,
TTFT and TPOT, and the throughput over the first count's. One run, one machine: the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadReport, LoadSpec, run_load
from moeshard.cluster.loadtest.progress import Progress
from moeshard.cluster.loadtest.serving_bench import (
    MODEL_NAME,
    add_model_arguments,
    benchmark_model,
    check_model_dir,
    served_model,
)
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)


async def _load(url: str, args: argparse.Namespace, label: str) -> LoadReport:
    async with AsyncClient(url, model=MODEL_NAME, timeout=600, max_retries=0) as client:
        await run_load(client, LoadSpec(requests=4, concurrency=4, prompt_len=args.prompt_len, output_len=4))  # warm-up
        spec = LoadSpec(
            requests=args.requests, concurrency=args.concurrency, prompt_len=args.prompt_len, output_len=args.output_len
        )
        progress = Progress(spec.requests, label)
        report = await run_load(client, spec, on_done=lambda r: progress.advance(r.ok))
        progress.close()
        return report


def format_reports(counts: list[int], reports: list[LoadReport], args: argparse.Namespace) -> str:
    base = reports[0].output_throughput
    lines = [
        f"{args.concurrency} clients, {args.requests} requests, {args.expert_actors} expert actors in one pool:",
        "",
        "| coordinators | output tok/s | vs first | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, r in zip(counts, reports):
        lines.append(
            f"| {count} | {r.output_throughput:.1f} | {r.output_throughput / base:.2f}x | {ms(r.ttft_p50_s)} | "
            f"{ms(r.ttft_p99_s)} | {ms(r.tpot_p50_s)} | {ms(r.tpot_p99_s)} | {r.failed} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.cluster.loadtest.coordinator_bench",
        description="Throughput with several coordinator counts over one shared pool of expert actors.",
    )
    add_model_arguments(parser)
    parser.add_argument("--coordinators", default="1,2", help="comma-separated coordinator counts (default: 1,2)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients (default: 64)")
    parser.add_argument("--requests", type=int, default=256, help="requests per count (default: 256)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, about (default: 32)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default: 32)")
    args = parser.parse_args(argv)
    try:
        args.coordinators = [int(c) for c in args.coordinators.split(",")]
    except ValueError:
        parser.error(f"--coordinators must be comma-separated integers, got {args.coordinators!r}")
    check_model_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    reports = []
    with benchmark_model(args.model_dir) as model_dir:
        for count in args.coordinators:
            with served_model(model_dir, args.expert_actors, coordinators=count) as url:
                reports.append(asyncio.run(_load(url, args, f"{count} coordinator(s)")))
    print(format_reports(args.coordinators, reports, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
