"""Failover benchmark (not a test): serve under closed-loop load while an expert actor is SIGKILLed every few seconds.

    python -m moeshard.cluster.loadtest.failover_bench [--model-dir DIR] [--clients 16] [--duration 180] [--kill-every 20]
        [--ping-pong-min-sequences N]

Three runs on the same model, one after the other: fault-free with 2 expert actors; 2 actors (each expert on
one actor: a kill waits for Ray's restart); 3 actors with every expert on two of them (a kill fails over to the
replica). Reported per run: requests completed and failed (the goal is 0 failed), TTFT and TPOT p50/p99 over
all requests and over the requests in flight at a kill, and the recovery time per kill (from the server's
``moeshard_expert_recovery_seconds``: failure noticed to the restarted actor taking work again).
With ``--ping-pong-min-sequences`` every run splits steps of that many sequences into two micro-batches, so a
kill can fail one pass while the other's dispatch is in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from pydantic import BaseModel

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadSpec, RequestRecord, percentile, stream_one, synthetic_prompt
from moeshard.cluster.loadtest.serving_bench import MODEL_NAME, free_port, write_synthetic_mixtral
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)

SCENARIOS = {
    "fault-free, 2 actors": dict(expert_actors=2, kill=False),
    "kills, 2 actors (no replicas)": dict(expert_actors=2, kill=True),
    "kills, 3 actors (every expert twice)": dict(expert_actors=3, kill=True, replicated=True),
}


class TimedRecord(BaseModel):
    started: float
    record: RequestRecord


class ScenarioResult(BaseModel):
    name: str
    completed: int
    failed: int
    kills: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    at_kill_ttft_p99_s: float | None  # requests in flight when an actor was killed
    at_kill_tpot_p99_s: float | None
    recovery_mean_s: float | None
    recovery_max_s: float | None
    first_error: str | None


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
TimedRecord.model_rebuild()
ScenarioResult.model_rebuild()


def expert_actor_pids() -> list[int]:
    """This process's expert actors (the local Ray started here runs them as its descendants), by process title."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::ExpertActor"):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


async def closed_loop_clients(url: str, args: argparse.Namespace, deadline: float) -> list[TimedRecord]:
    """``args.clients`` clients streaming one request after another until ``deadline``; every request timed."""
    spec = LoadSpec(requests=1, prompt_len=args.prompt_len, output_len=args.output_len)
    records: list[TimedRecord] = []

    async def worker(index: int) -> None:
        rng = random.Random(index)
        async with AsyncClient(url, model=MODEL_NAME, timeout=600, max_retries=0) as client:
            while time.monotonic() < deadline:
                started = time.monotonic()
                record = await stream_one(client, MODEL_NAME, synthetic_prompt(rng, spec.prompt_len), spec)
                records.append(TimedRecord(started=started, record=record))

    await asyncio.gather(*(worker(i) for i in range(args.clients)))
    return records


async def _killer(args: argparse.Namespace, deadline: float, kills: list[float]) -> None:
    rng = random.Random(0)
    while time.monotonic() + args.kill_every < deadline:
        await asyncio.sleep(args.kill_every)
        pids = expert_actor_pids()
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills.append(time.monotonic())


def _recoveries(url: str) -> tuple[float | None, float | None, int]:
    """Mean and max recovery seconds, and how many, from the server's histogram (max: the smallest bucket holding all)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    count = int(values.get("moeshard_expert_recovery_seconds_count", 0))
    if not count:
        return None, None, 0
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v) for k, v in values.items() if k.startswith("moeshard_expert_recovery_seconds_bucket")
    )
    bound = next(le for le, c in buckets if c >= count)
    return values["moeshard_expert_recovery_seconds_sum"] / count, bound, count


def run_scenario(name: str, model_dir: Path, args: argparse.Namespace) -> ScenarioResult:
    import ray
    from ray import serve

    from moeshard.actors.ray_init import init_ray
    from moeshard.deploy.app import build_app

    setup = SCENARIOS[name]
    port = free_port()
    init_ray(num_cpus=setup["expert_actors"] + 3, include_dashboard=False, logging_level="WARNING")
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        cluster = {"dispatch_timeout_s": 30}
        if setup.get("replicated"):
            cluster["expert_map"] = {e: [e % 3, (e + 1) % 3] for e in range(8)}
        engine = {"cluster": cluster, "ping_pong_min_sequences": args.ping_pong_min_sequences}
        app = {"model_dir": str(model_dir), "model_name": MODEL_NAME, "expert_actors": setup["expert_actors"], "engine": engine}
        serve.run(build_app(app), name="failover", route_prefix="/", logging_config=quiet)
        url = f"http://127.0.0.1:{port}"
        kills: list[float] = []

        async def load() -> list[TimedRecord]:
            deadline = time.monotonic() + args.duration
            killing = asyncio.create_task(_killer(args, deadline, kills)) if setup["kill"] else None
            records = await closed_loop_clients(url, args, deadline)
            if killing is not None:
                await killing
            return records

        records = asyncio.run(load())
        time.sleep(args.kill_every if setup["kill"] else 0)  # let the last restart finish before reading the histogram
        mean, worst, _ = _recoveries(url)
    finally:
        serve.shutdown()
        ray.shutdown()
    return summarize(name, records, kills, mean, worst)


def summarize(name: str, records: list[TimedRecord], kills: list[float], mean: float | None, worst: float | None) -> ScenarioResult:
    ok = [t for t in records if t.record.ok]
    at_kill = [t for t in ok if any(t.started <= k <= t.started + t.record.latency_s for k in kills)]
    failed = [t.record for t in records if not t.record.ok]

    def p(items: list[TimedRecord], field: str, q: float) -> float | None:
        return percentile([getattr(t.record, field) for t in items if getattr(t.record, field) is not None], q)

    return ScenarioResult(
        name=name,
        completed=len(ok),
        failed=len(failed),
        kills=len(kills),
        ttft_p50_s=p(ok, "ttft_s", 50),
        ttft_p99_s=p(ok, "ttft_s", 99),
        tpot_p50_s=p(ok, "tpot_s", 50),
        tpot_p99_s=p(ok, "tpot_s", 99),
        at_kill_ttft_p99_s=p(at_kill, "ttft_s", 99),
        at_kill_tpot_p99_s=p(at_kill, "tpot_s", 99),
        recovery_mean_s=mean,
        recovery_max_s=worst,
        first_error=failed[0].error if failed else None,
    )


def format_results(results: list[ScenarioResult]) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        "| run | completed | failed | kills | TTFT p50/p99 ms | TPOT p50/p99 ms | at a kill: TTFT p99 / TPOT p99 ms | recovery mean / max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.completed} | {r.failed} | {r.kills} | {ms(r.ttft_p50_s)} / {ms(r.ttft_p99_s)} | "
            f"{ms(r.tpot_p50_s)} / {ms(r.tpot_p99_s)} | {ms(r.at_kill_ttft_p99_s)} / {ms(r.at_kill_tpot_p99_s)} | "
            f"{s(r.recovery_mean_s)} / {s(r.recovery_max_s)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.cluster.loadtest.failover_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a Mixtral checkpoint with a tokenizer (default: a small synthetic one)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load per run (default: 180)")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills (default: 20)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, about (default: 32)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens per request (default: 32)")
    parser.add_argument(
        "--ping-pong-min-sequences", type=int, default=0, metavar="N",
        help="steps of at least N sequences run as two micro-batches (default: 0, never)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
    with tempfile.TemporaryDirectory(prefix="moeshard-bench") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else write_synthetic_mixtral(Path(tmp) / "synthetic-mixtral")
        results = [run_scenario(name, model_dir, args) for name in SCENARIOS]
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
