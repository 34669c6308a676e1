"""Scaling benchmark (not a test): serve under closed-loop load while the expert pool grows and shrinks.

    python -m moeshard.cluster.loadtest.scale_bench [--model-dir DIR] [--clients 16] [--duration 120] [--to 3]

One server with ``--expert-actors`` actors (default 2). A third of the way through the load the pool is
scaled to ``--to`` actors, two thirds of the way back (``POST /v1/experts/scale``). Reported per phase:
requests completed and failed (the goal is 0 failed), output tokens/s and TPOT p50/p99; per scaling: its
duration (call to answer: start, load, switch, drain), the requests in flight during it and their TPOT p99.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from pydantic import BaseModel

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.failover_bench import TimedRecord, closed_loop_clients
from moeshard.cluster.loadtest.loadgen import percentile
from moeshard.cluster.loadtest.serving_bench import add_model_arguments, benchmark_model, check_model_dir, served_model
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)


class Scaling(BaseModel):
    expert_actors: int  # after
    started: float  # monotonic
    seconds: float
    moved: int


class PhaseResult(BaseModel):
    name: str
    completed: int
    failed: int
    output_throughput: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None


def _finished_in(records: list[TimedRecord], start: float, end: float) -> list[TimedRecord]:
    return [t for t in records if start <= t.started + t.record.latency_s < end]


def _during(records: list[TimedRecord], scaling: Scaling) -> list[TimedRecord]:
    end = scaling.started + scaling.seconds
    return [t for t in records if t.started < end and t.started + t.record.latency_s > scaling.started]


def phase(name: str, records: list[TimedRecord], start: float, end: float) -> PhaseResult:
    done = _finished_in(records, start, end)
    ok = [t.record for t in done if t.record.ok]
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    return PhaseResult(
        name=name,
        completed=len(ok),
        failed=len(done) - len(ok),
        output_throughput=sum(r.output_tokens for r in ok) / (end - start) if end > start else None,
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
    )


async def _scale_at(url: str, plan: list[tuple[float, int]], scalings: list[Scaling]) -> None:
    """At each (monotonic time, expert actors) of ``plan`` in turn, scale the pool to that many actors."""
    async with AsyncClient(url, timeout=900, max_retries=0) as client:
        for when, expert_actors in plan:
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            started = time.monotonic()
            report = await client.scale(expert_actors)
            seconds = time.monotonic() - started
            scalings.append(Scaling(expert_actors=report.expert_actors, started=started, seconds=seconds, moved=report.moved))


def run(model_dir, args: argparse.Namespace) -> tuple[list[PhaseResult], list[Scaling], list[TimedRecord]]:
    with served_model(model_dir, args.expert_actors, extra_cpus=max(0, args.to - args.expert_actors)) as url:

        async def load() -> tuple[list[TimedRecord], list[Scaling], float]:
            begin = time.monotonic()
            deadline = begin + args.duration
            scalings: list[Scaling] = []
            plan = [(begin + args.duration / 3, args.to), (begin + 2 * args.duration / 3, args.expert_actors)]
            scaler = asyncio.create_task(_scale_at(url, plan, scalings))
            records = await closed_loop_clients(url, args, deadline)
            await scaler
            return records, scalings, begin

        records, scalings, begin = asyncio.run(load())
    up, down = scalings
    end = max((t.started + t.record.latency_s for t in records), default=begin)
    phases = [
        phase(f"{args.expert_actors} actors", records, begin, up.started),
        phase(f"{args.to} actors", records, up.started + up.seconds, down.started),
        phase(f"{args.expert_actors} actors again", records, down.started + down.seconds, end),
    ]
    return phases, scalings, records


def format_results(phases: list[PhaseResult], scalings: list[Scaling], records: list[TimedRecord]) -> str:
    lines = [
        "| phase | completed | failed | output tok/s | TPOT p50 / p99 (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    for p in phases:
        tps = "-" if p.output_throughput is None else f"{p.output_throughput:.1f}"
        lines.append(f"| {p.name} | {p.completed} | {p.failed} | {tps} | {ms(p.tpot_p50_s)} / {ms(p.tpot_p99_s)} |")
    lines += ["", "| scaling | seconds | replicas moved | requests in flight | failed | their TPOT p99 (ms) |", "|---|---:|---:|---:|---:|---:|"]
    before = phases[0].name.split()[0]
    for scaling in scalings:
        during = _during(records, scaling)
        failed = sum(not t.record.ok for t in during)
        tpot = percentile([t.record.tpot_s for t in during if t.record.ok and t.record.tpot_s is not None], 99)
        lines.append(f"| to {scaling.expert_actors} | {scaling.seconds:.1f} | {scaling.moved} | {len(during)} | {failed} | {ms(tpot)} |")
    total_failed = sum(not t.record.ok for t in records)
    lines += ["", f"{len(records)} requests, {total_failed} failed; started with {before} expert actors."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.cluster.loadtest.scale_bench", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--to", type=int, default=3, help="expert actors to scale to, then back (default: 3)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default: 120)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, about (default: 32)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default: 32)")
    args = parser.parse_args(argv)
    check_model_dir(parser, args)
    if args.to < 1 or args.to == args.expert_actors:
        parser.error(f"--to must be at least 1 and differ from --expert-actors ({args.expert_actors}), got {args.to}")
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    with benchmark_model(args.model_dir) as model_dir:
        phases, scalings, records = run(model_dir, args)
    print(format_results(phases, scalings, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
