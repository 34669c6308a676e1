"""What an engine step asks of the host and the device: ``python -m moeshard.cluster.loadtest.step_profile``.

    python -m moeshard.cluster.loadtest.step_profile [MODEL_DIR] [--device cuda] [--dtype bfloat16]
        [--sequences 32] [--prompt-len 128] [--tokens 16] [--prefill-len 4096] [--table N] [--host-plan-max-ids N]

One process, the experts in it, ``torch.profiler`` around two workloads after one warm-up round of each:

- **prefill**: one prompt of ``--prefill-len`` tokens, one new token (one step);
- **decode**: ``--sequences`` prompts of ``--prompt-len`` tokens, greedy with ``ignore_eos``: their prefill
  (and first token) before the profile, then ``--tokens`` decode steps profiled, one token each.

Per workload it prints the wall time (unprofiled, run just before), and per step the time the device was busy
(CUDA kernels and copies; nothing on the CPU), the kernel launches, the host syncs (stream and device
synchronisations) and the torch ops dispatched. On a GPU the gap between wall time and busy time is what the
host costs: the lever for CUDA graphs or fewer ops (docs/gpu.md). ``--table N`` adds the N ops with the most
host time. Without MODEL_DIR it writes prefill_bench's synthetic Mixtral.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

from moeshard.cluster.loadtest.prefill_bench import SIZES, prompt_ids, timed

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


class StepProfile(NamedTuple):
    workload: str
    steps: int  # engine steps the workload took
    wall_ms: float  # the whole workload, unprofiled
    device_busy_ms: float  # per step: CUDA kernels and copies (0 on the CPU)
    launches: float  # per step: kernel launches
    syncs: float  # per step: stream and device synchronisations
    ops: float  # per step: torch ops dispatched (aten::*, the ops that others call inside them too)
    table: str  # the ops with the most host time ('' unless asked)


def profile_workload(
    name: str, prepare: Callable[[], object], run: Callable[[], int], device: torch.device, table_rows: int = 0
) -> StepProfile:
    """Profile one call of ``run`` (after one warm-up call and one timed call), each after its own ``prepare``
    (neither timed nor profiled); ``run`` returns the engine steps it took, and the figures are per step."""
    prepare()
    run()
    prepare()
    steps = 0

    def counted() -> None:
        nonlocal steps
        steps = run()

    wall_s = timed(counted, device)
    prepare()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled_steps = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    assert profiled_steps == steps, f"{name}: {steps} steps timed, {profiled_steps} profiled"
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    syncs = sum(e.count for e in events if e.key in SYNCS)
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=table_rows) if table_rows else ""
    return StepProfile(name, steps, wall_s * 1e3, busy_us / 1e3 / steps, launches / steps, syncs / steps, ops / steps, table)


def steps_to_finish(engine) -> int:
    """Step the engine until its requests are done; the steps taken."""
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps


def run(model_dir: Path, args: argparse.Namespace) -> list[StepProfile]:
    from moeshard.cluster.engine.llm import LLM
    from moeshard.cluster.engine.sampling import SamplingParams

    device = torch.device(args.device)
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, max_batch_tokens=max(4096, args.prefill_len),
              kv_cache_bytes=args.kv_cache_mb * 2**20, enable_prefix_caching=False)  # fmt: skip
    try:
        vocab = llm.model_config.vocab_size
        prompt = prompt_ids(args.prefill_len, vocab, 1)
        prompts = [prompt_ids(args.prompt_len, vocab, 1000 + b) for b in range(args.sequences)]

        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

        engine = llm.engine

        def add_prefill() -> None:
            engine.add_request("prefill", prompt, params(1))

        def add_and_prefill_decodes() -> None:
            """The sequences admitted, their prompts computed and first tokens sampled: only decode steps remain."""
            for b, ids in enumerate(prompts):
                engine.add_request(f"decode-{b}", ids, params(args.tokens + 1))
            while engine.waiting or any(len(seq.token_ids) == seq.prompt_len for seq in engine.running):
                engine.step()

        return [
            profile_workload(f"prefill {args.prefill_len}", add_prefill, lambda: steps_to_finish(engine), device, args.table),
            profile_workload(
                f"decode {args.sequences} x {args.tokens}", add_and_prefill_decodes, lambda: steps_to_finish(engine), device,
                args.table,
            ),
        ]  # fmt: skip
    finally:
        llm.close()


def format_profiles(profiles: list[StepProfile]) -> str:
    lines = [
        "| workload | steps | wall ms | ms a step | device busy ms a step | launches a step | syncs a step | ops a step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in profiles:
        lines.append(
            f"| {p.workload} | {p.steps} | {p.wall_ms:.1f} | {p.wall_ms / p.steps:.2f} | {p.device_busy_ms:.2f} | "
            f"{p.launches:.0f} | {p.syncs:.0f} | {p.ops:.0f} |"
        )
    for p in profiles:
        if p.table:
            lines += ["", f"{p.workload}, the ops with the most host time (the whole workload):", p.table]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=None, help="a checkpoint (default: a synthetic Mixtral)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sequences", type=int, default=32, help="sequences decoding at once (default: 32)")
    parser.add_argument("--prompt-len", type=int, default=128, help="their prompt tokens (default: 128)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens each decodes (default: 16)")
    parser.add_argument("--prefill-len", type=int, default=4096, help="the prefill's prompt tokens (default: 4096)")
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="the engine's KV cache (default: 1024)")
    parser.add_argument("--table", type=int, default=0, metavar="N", help="also print the N ops with the most host time")
    parser.add_argument(
        "--host-plan-max-ids", type=int, default=None, metavar="N",
        help="plan a permutation of up to N device ids on the host (default: the library's, 1024; 0: on the device)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral

    args = parse_args(argv)
    if args.host_plan_max_ids is not None:
        # the module, not moeshard.kernels' attribute of the same name (the permute function)
        importlib.import_module("moeshard.kernels.permute").HOST_PLAN_MAX_IDS = args.host_plan_max_ids
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="moeshard-step-profile") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            positions = max(args.prefill_len, args.prompt_len + args.tokens) + 1
            model_dir = write_synthetic_mixtral(Path(tmp) / "mixtral", max_position_embeddings=positions, dtype=torch.float32, **SIZES)
        profiles = run(model_dir, args)
    host_plan = importlib.import_module("moeshard.kernels.permute").HOST_PLAN_MAX_IDS
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"permutations of up to {host_plan} device ids planned on the host")  # fmt: skip
    print(format_profiles(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
