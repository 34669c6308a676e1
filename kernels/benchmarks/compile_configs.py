"""Compile every GPU configuration of the autotuned kernels for A100 (sm_80) and H100 (sm_90), no GPU needed:
``python -m moeshard.kernels.benchmarks.compile_configs``.

Triton compiles ahead of time for a target it is told (its wheel carries ``ptxas``), so whether each tile
shape, warp count and pipeline depth of ``tuning.py`` compiles, and how much shared memory it takes, can
be read on any machine. Prints, per kernel, dtype and dot precision, row block and configuration, the
shared memory each target's binary needs, against the part's limit per block, and whether the pruning
keeps the configuration at Mixtral 8x7B's sizes. What it cannot show is speed: that takes a GPU
(``benchmarks.kernels``).

Triton must not be in interpreter mode: the module re-executes itself with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import triton

# Shared memory a block may take: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TYPES = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    kernel: str  # gate_up, down, attention
    arch: int
    dtype: str  # bfloat16, float32
    precision: str  # ieee, tf32
    block_m: int
    config_index: int


@dataclass(frozen=True)
class Compiled:
    case: Case
    config: str
    shared: int | None  # bytes; None when it did not compile
    kept: bool  # the pruning keeps it at Mixtral's sizes
    error: str = ""


# Integer arguments at Mixtral 8x7B's sizes, as a serving launch passes them (Triton specializes a 1 to a
# constant and marks multiples of 16, which decides how wide its loads and whether its copies are pipelined).
D, I, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4096, 14336, 32, 8, 128, 16
INTEGERS = {
    "gate_up": dict(D=D, I=I, stride_xn=D, stride_1e=I * D, stride_1i=D, stride_1d=1, stride_3e=I * D, stride_3i=D,
                    stride_3d=1, stride_hn=I),
    "down": dict(D=D, I=I, stride_hn=I, stride_2e=D * I, stride_2d=I, stride_2i=1, stride_on=D),
    "attention": dict(stride_qt=HEADS * HEAD_DIM, stride_qh=HEAD_DIM, stride_ks=KV_HEADS * HEAD_DIM, stride_kh=HEAD_DIM,
                      stride_vs=KV_HEADS * HEAD_DIM, stride_vh=HEAD_DIM, stride_ot=HEADS * HEAD_DIM, stride_oh=HEAD_DIM,
                      stride_tb=129, window=0, block_size=BLOCK_SIZE, head_dim=HEAD_DIM),
}  # fmt: skip


@dataclass(frozen=True)
class LaunchSpec:
    fn: object  # the kernel's JITFunction
    signature: dict[str, str]
    constants: dict[str, object]  # integer arguments Triton turns into constants (those equal to 1)
    attrs: dict[tuple[int], list]  # the arguments marked divisible by 16 (pointers: aligned to 16 bytes)


def launch_spec(kernel: str, dtype: str) -> LaunchSpec:
    """What Triton sees of a serving launch of ``kernel`` at Mixtral's sizes: argument types, constants, alignment."""
    element = "*" + TYPES[dtype]
    if kernel == "attention":
        fn = importlib.import_module("moeshard.kernels.paged_attention")._paged_attention_kernel.fn
        pointer_types = {"tables_ptr": "*i32", "prog_seq_ptr": "*i32"}
        pointer_types.update(dict.fromkeys(("query_starts_ptr", "query_lens_ptr", "start_pos_ptr", "prog_first_ptr"), "*i64"))
    else:
        module = importlib.import_module("moeshard.kernels.expert_ffn")
        fn = (module._gate_up_kernel if kernel == "gate_up" else module._down_kernel).fn
        pointer_types = {"block_expert_ptr": "*i32", "offsets_ptr": "*i64", "block_start_ptr": "*i64"}
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, element)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            value = INTEGERS[kernel][name]
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
    return LaunchSpec(fn, signature, constants, attrs)


def _configs(kernel: str) -> list[triton.Config]:
    tuning = importlib.import_module("moeshard.kernels.tuning")
    return tuning.ATTENTION_CONFIGS if kernel == "attention" else tuning.GEMM_CONFIGS


def _kept(case: Case, config: triton.Config) -> bool:
    """Whether the pruning times this configuration at Mixtral's sizes on the case's part."""
    tuning = importlib.import_module("moeshard.kernels.tuning")
    itemsize = 2 if case.dtype == "bfloat16" else 4
    budget = SHARED_LIMIT[case.arch] - tuning.SCRATCH
    if case.kernel == "attention":
        return tuning.attention_fits(config, case.block_m, HEAD_DIM, itemsize, budget)
    out, reduce, operands = (I, D, 2) if case.kernel == "gate_up" else (D, I, 1)
    return tuning.gemm_fits(config, case.block_m, out, reduce, itemsize, operands, budget)


def compile_case(case: Case) -> Compiled:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = _configs(case.kernel)[case.config_index]
    spec = launch_spec(case.kernel, case.dtype)
    fn = spec.fn
    constants = {"BLOCK_M": case.block_m, "DOT_FP32": False, "PRECISION": case.precision, **config.kwargs, **spec.constants}
    if case.kernel == "attention":
        group = HEADS // KV_HEADS
        constants.update(GROUP=group, QUERIES=max(1, case.block_m // group), SLIDING=False, BLOCK_D=HEAD_DIM)
    described = (
        ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f", warps={config.num_warps}, stages={config.num_stages}"
    )
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(fn, spec.signature, constexprs=constexprs, attrs=spec.attrs)
    try:
        binary = triton.compile(
            source,
            target=GPUTarget("cuda", case.arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as exc:  # a configuration that does not compile is a finding, not a crash of the check
        return Compiled(case, described, None, _kept(case, config), str(exc).splitlines()[0][:120])
    return Compiled(case, described, binary.metadata.shared, _kept(case, config))


DOTS = {"bfloat16": ("bfloat16", "ieee"), "float32": ("float32", "ieee"), "tf32": ("float32", "tf32")}


def all_cases(archs: list[int], block_ms: list[int], dots: list[str], kept_only: bool = False) -> list[Case]:
    cases = []
    for kernel in ("gate_up", "down", "attention"):
        for arch in archs:
            for dtype, precision in (DOTS[d] for d in dots):
                for block_m in block_ms:
                    for index, config in enumerate(_configs(kernel)):
                        case = Case(kernel, arch, dtype, precision, block_m, index)
                        if not kept_only or _kept(case, config):
                            cases.append(case)
    return cases


def format_results(results: list[Compiled]) -> str:
    lines = [
        "| kernel | sm | dtype | dot | BLOCK_M | configuration | shared KiB | limit KiB | fits | pruning keeps |",
        "|---|---:|---|---|---:|---|---:|---:|---|---|",
    ]
    for r in results:
        c, limit = r.case, SHARED_LIMIT[r.case.arch]
        shared = f"{r.shared / 1024:.0f}" if r.shared is not None else f"failed: {r.error}"
        fits = "yes" if r.shared is not None and r.shared <= limit else "no"
        lines.append(
            f"| {c.kernel} | {c.arch} | {c.dtype} | {c.precision} | {c.block_m} | {r.config} | {shared} "
            f"| {limit // 1024} | {fits} | {'yes' if r.kept else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--block-m", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dots", nargs="+", choices=sorted(DOTS), default=["bfloat16", "float32", "tf32"])
    parser.add_argument("--kept-only", action="store_true", help="only the configurations the pruning keeps")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.execve(sys.executable, [sys.executable, "-m", "moeshard.kernels.benchmarks.compile_configs", *(argv or sys.argv[1:])],
                  {**os.environ, "TRITON_INTERPRET": "0"})  # fmt: skip
    cases = all_cases(args.archs, args.block_m, args.dots, args.kept_only)
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(compile_case, cases))
    print(f"triton {triton.__version__}: {len(results)} configurations compiled for sm_{', sm_'.join(map(str, args.archs))}")
    print()
    print(format_results(results))
    over = [r for r in results if r.kept and (r.shared is None or r.shared > SHARED_LIMIT[r.case.arch])]
    print()
    print(f"kept by the pruning but failing or over the limit: {len(over)}")
    if args.json:
        records = [{**asdict(r.case), "config": r.config, "shared": r.shared, "limit": SHARED_LIMIT[r.case.arch],
                    "kept": r.kept, "error": r.error} for r in results]  # fmt: skip
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
