"""``moeshard bench``: load-test a running server and print throughput, TTFT and TPOT (optionally as JSON)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from moeshard.cluster.cli.server_flags import add_server_arguments, exits_on_client_error, fail
from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadReport, LoadSpec, run_load
from moeshard.cluster.loadtest.progress import Progress
from moeshard.cluster.loadtest.table import ms


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="load-test a running server (throughput, TTFT, TPOT)",
        description="Send synthetic prompts to a running server, N clients at a time (closed loop) or at a Poisson "
        "request rate, each generating exactly --output-len tokens (ignore_eos), and print requests/s, output "
        "tokens/s, and time to first token (TTFT) and per output token (TPOT) at p50 and p99. --shared-prefix-len "
        "starts every prompt with the same text; --turns makes each request a multi-turn chat.",
    )
    add_server_arguments(bench)
    bench.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: 1; no cap with --request-rate)")
    bench.add_argument("--requests", type=int, default=32, help="requests to send (default: 32)")
    bench.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals at this many requests/s (default: closed loop)")
    bench.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens, about (default: 32)")
    bench.add_argument("--output-len", type=int, default=32, help="tokens each request generates (default: 32)")
    bench.add_argument(
        "--shared-prefix-len", type=int, default=0, help="tokens of one text every prompt starts with, about (default: 0)"
    )
    bench.add_argument(
        "--turns", type=int, default=1, help="> 1: each request is a chat of this many turns, each resending the earlier ones"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default: 0)")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the report (with every request) to FILE")
    bench.set_defaults(run=run_bench)


@exits_on_client_error
def run_bench(args: argparse.Namespace) -> None:
    spec = LoadSpec(
        requests=args.requests,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        shared_prefix_len=args.shared_prefix_len,
        turns=args.turns,
        seed=args.seed,
    )
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"cannot write --json {args.json}: its directory does not exist")
    report = asyncio.run(_bench(args, spec))
    print(format_summary(report))
    print(format_table([report]))
    if args.json is not None:
        Path(args.json).write_text(report.model_dump_json(indent=2) + "\n")
    if report.completed == 0:
        fail(f"every request failed; the first: {report.first_error}")


async def _bench(args: argparse.Namespace, spec: LoadSpec) -> LoadReport:
    async with AsyncClient(args.url, args.api_key, model=args.model, timeout=args.timeout) as client:
        model = args.model or (await client.models())[0].id  # fails early on a wrong URL or key
        progress = Progress(spec.requests, "bench")
        report = await run_load(client, spec, model, on_done=lambda record: progress.advance(record.ok))
        progress.close()
        return report


def format_summary(report: LoadReport) -> str:
    failed = f", {report.failed} failed (first: {report.first_error})" if report.failed else ""
    summary = (
        f"{report.completed} requests in {report.duration_s:.1f} s{failed}; on average {report.mean_prompt_tokens:.1f} "
        f"prompt and {report.mean_output_tokens:.1f} output tokens"
    )
    if report.turn_ttft_p50_s:
        turns = ", ".join("-" if t is None else f"{1000 * t:.1f}" for t in report.turn_ttft_p50_s)
        summary += f"\nTTFT p50 by turn (ms): {turns}"
    return summary


def format_table(reports: list[LoadReport]) -> str:
    """A Markdown table, one row per report."""
    lines = [
        "| concurrency | rate (req/s) | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        rate = "-" if r.spec.request_rate is None else f"{r.spec.request_rate:g}"
        cap = r.spec.max_in_flight if r.spec.concurrency is not None or r.spec.request_rate is None else "-"
        lines.append(
            f"| {cap} | {rate} | {r.completed} | {r.request_throughput:.2f} | {r.output_throughput:.1f} | {ms(r.ttft_p50_s, 1)} | "
            f"{ms(r.ttft_p99_s, 1)} | {ms(r.tpot_p50_s, 1)} | {ms(r.tpot_p99_s, 1)} |"
        )
    return "\n".join(lines)
