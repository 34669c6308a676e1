"""Peer benchmark: the same load against several OpenAI-compatible servers, started and stopped one after another.

    python -m moeshard.cluster.loadtest.peer_bench \\
        --server moeshard "moeshard serve models/demo --expert-actors 2 --port {port}" \\
        --server vllm "/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model models/demo --port {port}" \\
        [--concurrency 1,16,64] [--prompt-len 32] [--output-len 64]

Each ``--server NAME COMMAND`` is a shell command that serves one model on 127.0.0.1 at ``{port}`` (a free port
filled in here). One at a time, so that no server's idle threads take cores from another: start it in a
session of its own, wait for ``/v1/models``, warm it up (two short requests, then one wave at the highest
concurrency, so that compilation and first-batch costs fall outside the measurement), run ``loadgen.run_load``
at each concurrency (closed loop, prompts of about ``--prompt-len`` words, exactly ``--output-len`` greedy
tokens with ``ignore_eos``, the same prompts for every server), then stop it (SIGTERM to its session, SIGKILL
after a grace period) and wait for its port to close.

The table gives each server's output tokens/s and TPOT p50 per concurrency, its throughput as a ratio of the
first server's, and how many of its completions are the first server's text exactly. The server that is not
moeshard runs from its own environment: it is a peer to measure against, never a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
from pydantic import BaseModel

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadReport, LoadSpec, run_load
from moeshard.cluster.loadtest.serving_bench import add_level_arguments, free_port, parse_levels, run_levels
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)

STOP_GRACE_S = 60.0


class ServerSpec(BaseModel):
    name: str
    command: str  # a shell command with "{port}" where the port goes


class ServerResult(BaseModel):
    name: str
    command: str
    startup_s: float
    reports: list[LoadReport]


class PeerBenchResult(BaseModel):
    prompt_len: int
    output_len: int
    servers: list[ServerResult]


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
ServerResult.model_rebuild()
PeerBenchResult.model_rebuild()


class ServerFailed(RuntimeError):
    """A server exited or did not answer in time; the message has the end of its log."""


@contextlib.contextmanager
def started_server(spec: ServerSpec, log_dir: Path, startup_timeout_s: float) -> Iterator[tuple[str, float]]:
    """Run ``spec.command`` on a free port in a session of its own; yield (its /v1 URL, seconds it took to answer)."""
    port = free_port()
    log_path = log_dir / f"{spec.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            spec.command.format(port=port), shell=True, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    try:
        _wait_ready(process, url, log_path, startup_timeout_s)
        yield url, time.perf_counter() - started
    finally:
        _stop(process, port)


def _wait_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"exited with {process.returncode}:\n{_log_tail(log_path)}")
        with contextlib.suppress(httpx2.HTTPError):
            if httpx2.get(f"{url}/models", timeout=5).status_code == 200:
                return
        time.sleep(2)
    raise ServerFailed(f"did not answer {url}/models within {timeout_s:.0f} s:\n{_log_tail(log_path)}")


def _stop(process: subprocess.Popen, port: int) -> None:
    """SIGTERM to the server's session, SIGKILL after ``STOP_GRACE_S``; then wait until nothing listens on its port."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        logger.warning("server did not stop within %.0f s of SIGTERM; killing its session", STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what it left behind in its session
    process.wait()
    deadline = time.monotonic() + STOP_GRACE_S
    while _listening(port) and time.monotonic() < deadline:
        time.sleep(1)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def load_server(url: str, args: argparse.Namespace) -> list[LoadReport]:
    async with AsyncClient(url, timeout=1800, max_retries=0) as client:
        model = (await client.models())[0].id
        top = max(args.concurrency)
        await run_load(client, LoadSpec(requests=2, concurrency=1, prompt_len=args.prompt_len, output_len=4), model)
        await run_load(client, LoadSpec(requests=top, concurrency=top, prompt_len=args.prompt_len, output_len=4), model)
        return await run_levels(client, model, args)


def same_texts(report: LoadReport, reference: LoadReport) -> int:
    """Completions whose text equals the reference server's for the same prompt."""
    return sum(r.ok and ref.ok and r.text == ref.text for r, ref in zip(report.records, reference.records))


def format_result(result: PeerBenchResult) -> str:
    reference = result.servers[0]

    lines = [
        f"| server | concurrency | requests | failed | output tok/s | vs {reference.name} | TPOT p50 (ms) | TTFT p50 (ms) | "
        f"same text as {reference.name} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, ref in enumerate(reference.reports):
        for server in result.servers:
            r = server.reports[level]
            lines.append(
                f"| {server.name} | {r.spec.concurrency} | {r.completed} | {r.failed} | {r.output_throughput:.1f} | "
                f"{r.output_throughput / ref.output_throughput:.2f}x | {ms(r.tpot_p50_s)} | {ms(r.ttft_p50_s)} | "
                f"{same_texts(r, ref)}/{len(r.records)} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.cluster.loadtest.peer_bench",
        description="Start each server in turn, load it at several concurrencies, compare throughput and outputs.",
    )
    parser.add_argument(
        "--server", nargs=2, action="append", required=True, metavar=("NAME", "COMMAND"),
        help="a name and a shell command that serves on 127.0.0.1 at {port}; repeat; the first is the reference",
    )  # fmt: skip
    add_level_arguments(parser, concurrency="1,16,64", output_len=64)
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to answer")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results (every request) to FILE")
    args = parser.parse_args(argv)
    parse_levels(parser, args)
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"cannot write --json {args.json}: its directory does not exist")
    args.servers = [ServerSpec(name=name, command=command) for name, command in args.server]
    for server in args.servers:
        if "{port}" not in server.command:
            parser.error(f"the command of server {server.name!r} must contain {{port}}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # this script's progress; not every HTTP request of the client
    results = []
    with tempfile.TemporaryDirectory(prefix="moeshard-peer-bench") as log_dir:
        for spec in args.servers:
            logger.info("starting %s: %s", spec.name, spec.command)
            try:
                with started_server(spec, Path(log_dir), args.startup_timeout) as (url, startup_s):
                    logger.info("%s answers at %s after %.0f s", spec.name, url, startup_s)
                    reports = asyncio.run(load_server(url, args))
            except ServerFailed as exc:
                print(f"peer_bench: server {spec.name!r} {exc}", file=sys.stderr)
                return 1
            results.append(ServerResult(name=spec.name, command=spec.command, startup_s=startup_s, reports=reports))
    result = PeerBenchResult(prompt_len=args.prompt_len, output_len=args.output_len, servers=results)
    print(format_result(result))
    if args.json is not None:
        Path(args.json).write_text(result.model_dump_json(indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
