"""Decode throughput through expert actors with and without ping-pong micro-batches (not a test).

    python -m moeshard.actors.benchmarks.ping_pong [--expert-actors 4] [--sequences 32] [--new-tokens 48]
                                                   [--coordinator-cpus 1[,2]] [--lm-head-threads 1,auto]

A synthetic Mixtral (``--layers`` layers, hidden 512, 8 experts top-2, float32) decodes ``--sequences``
greedy sequences of ``--new-tokens`` tokens each: in one process (the reference), with the experts on
``--expert-actors`` actors as one batch per step, and with each step split into two micro-batches whose
attention and experts overlap (``ping_pong_min_sequences``). With several ``--coordinator-cpus`` values
the one-batch run is repeated with the coordinator on each (``cluster.coordinator_cpus``: the CPUs it asks
Ray for and its torch threads), and likewise for each of several ``--lm-head-threads`` (``lm_head_threads``:
the LM head's threads, auto for every CPU); ping-pong runs with the first of each. All run in turn,
``--repeats`` times, on the same prompts; the table gives the median output tokens/s and the ratios. One
run, one machine: read the ratios. Every configuration's tokens are checked equal to the reference.

A second table says where the time went (Linux: from /proc): per run, the CPU seconds of the process that
runs the model (this one, or the coordinator actor) and of the expert actors, and the share of the machine's
cores left idle. On a machine with fewer cores than processes, idle cores beside a slower run mean the work
waited on itself (the coordinator's part of a layer, then the actors' part), not that the cores were short.
"""

from __future__ import annotations

import argparse
import contextlib
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
    cpu: dict[str, float]  # role -> CPU seconds during the run ("model": this process or the coordinator actor)
    idle: float | None  # share of the machine's cores idle during the run (None without /proc)


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process ("model") and of the Ray workers running a coordinator or expert actor
    ({} without /proc). Idle actors of another cluster count too, at next to nothing."""
    if not os.path.exists("/proc/stat"):
        return {}
    roles = {b"OfflineCoordinator": "model", b"ExpertActor": "experts"}
    totals, tick = {"model": 0.0, "experts": 0.0}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
            role = "model" if int(pid) == os.getpid() else next((r for key, r in roles.items() if key in command), None)
            if role is None:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            totals[role] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, ValueError):  # a process that ended meanwhile
            continue
    return totals


def _idle_ticks() -> tuple[int, int] | None:
    """(idle, all) clock ticks of every core so far, from /proc/stat."""
    if not os.path.exists("/proc/stat"):
        return None
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait


def _time_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> Timed:
    cpu_before, idle_before = _cpu_by_role(), _idle_ticks()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    cpu_after, idle_after = _cpu_by_role(), _idle_ticks()
    cpu = {role: cpu_after[role] - cpu_before[role] for role in cpu_after}
    idle = None
    if idle_before and idle_after and idle_after[1] > idle_before[1]:
        idle = (idle_after[0] - idle_before[0]) / (idle_after[1] - idle_before[1])
    return Timed(seconds, [o.token_ids for o in outputs], cpu, idle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.ping_pong", description=__doc__.split("\n")[0])
    parser.add_argument("--expert-actors", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coordinator-cpus", default="1", help="comma-separated: one one-batch run per value")
    parser.add_argument(
        "--lm-head-threads", default="auto",
        help="comma-separated, each a number or auto (every CPU): one one-batch run per value and coordinator CPUs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    coordinator_cpus = [int(v) for v in args.coordinator_cpus.split(",")]
    lm_head_threads = [None if v == "auto" else int(v) for v in args.lm_head_threads.split(",")]
    logging.basicConfig(level="WARNING")
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(2, 32000) for _ in range(15)] for _ in range(args.sequences)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    tokens = args.sequences * args.new_tokens
    with tempfile.TemporaryDirectory(prefix="moeshard-bench") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
        model_dir = write_synthetic_mixtral(Path(tmp) / "model", num_hidden_layers=args.layers)
        # room for every cluster: half a CPU per actor, the coordinator's CPUs
        clusters = len(coordinator_cpus) * len(lm_head_threads) + 1
        init_ray(num_cpus=clusters * (args.expert_actors + 2 * max(coordinator_cpus)) + 4, include_dashboard=False,
                 logging_level="WARNING")  # fmt: skip
        with contextlib.ExitStack() as stack:
            llms = {"one process": stack.enter_context(LLM(model_dir, enable_prefix_caching=False))}

            def sharded(cpus: int, ping_pong: int, head_threads: int | None) -> LLM:
                cluster = {"cpus_per_actor": 0.5, "coordinator_cpus": cpus}
                return stack.enter_context(LLM(model_dir, expert_actors=args.expert_actors, cluster=cluster,
                                               enable_prefix_caching=False, ping_pong_min_sequences=ping_pong,
                                               lm_head_threads=head_threads))  # fmt: skip

            for cpus in coordinator_cpus:
                for head_threads in lm_head_threads:
                    on = "" if coordinator_cpus == [1] else f", coordinator on {cpus} CPU" + "s" * (cpus > 1)
                    on += f", LM head threads {head_threads or 'auto'}" if len(lm_head_threads) > 1 else ""
                    llms["actors, one batch" + on] = sharded(cpus, 0, head_threads)
            llms["actors, ping-pong"] = sharded(coordinator_cpus[0], 8, lm_head_threads[0])
            for llm in llms.values():
                _time_generate(llm, prompts[:2], SamplingParams(max_tokens=2, temperature=0))  # warm-up
            runs = {name: [] for name in llms}
            expected = None
            for _ in range(args.repeats):
                for name, llm in llms.items():
                    timed = _time_generate(llm, prompts, params)
                    expected = expected or timed.token_ids
                    if timed.token_ids != expected:
                        raise AssertionError(f"{name}: tokens differ from the one-process run")
                    runs[name].append(timed)
    ray.shutdown()
    base = statistics.median(tokens / t.seconds for t in runs["one process"])
    print(f"{args.sequences} sequences x {args.new_tokens} new tokens, {args.layers} layers, {args.expert_actors} expert actors:")
    print()
    print("| configuration | output tok/s (median) | vs one process |")
    print("|---|---:|---:|")
    for name, timed in runs.items():
        rate = statistics.median(tokens / t.seconds for t in timed)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    if all(t.cpu and t.idle is not None for timed in runs.values() for t in timed):
        print()
        print("Where a run's time went (medians; CPU seconds summed over each role's processes):")
        print()
        print("| configuration | wall s | model CPU s | expert actors CPU s | cores idle |")
        print("|---|---:|---:|---:|---:|")
        for name, timed in runs.items():
            wall, idle = statistics.median(t.seconds for t in timed), statistics.median(t.idle for t in timed)
            model, experts = (statistics.median(t.cpu[role] for t in timed) for role in ("model", "experts"))
            print(f"| {name} | {wall:.2f} | {model:.2f} | {experts:.2f} | {idle:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
