"""Compile every Triton kernel, and every GPU configuration of the autotuned ones, for A100 (sm_80) and H100
(sm_90), no GPU needed: ``python -m moeshard.kernels.benchmarks.compile_configs``.

Triton compiles ahead of time for a target it is told (its wheel carries ``ptxas``), so whether each tile
shape, warp count and pipeline depth of ``tuning.py`` compiles, and how much shared memory it takes, can
be read on any machine. Prints, per kernel, dtype and dot precision, row block and configuration, the
shared memory each target's binary needs, against the part's limit per block, and whether the pruning
keeps the configuration at Mixtral 8x7B's sizes. The kernels that are not autotuned (route, the permute
gather, combine, RMSNorm, rotary, rotary with the cache store) compile once per part and dtype, with the
tiles their wrappers pick at those sizes.
What it cannot show is speed: that takes a GPU (``benchmarks.kernels``).

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

import torch
import triton

# Shared memory a block may take: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TYPES = {"bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    kernel: str  # gate_up, down, attention (autotuned); route, gather, combine, rms_norm, rotary, rotary_store (fixed tiles)
    arch: int
    dtype: str  # bfloat16, float32
    precision: str  # ieee, tf32
    block_m: int  # 0 for the kernels with fixed tiles
    config_index: int  # 0 for the kernels with fixed tiles (one configuration)


@dataclass(frozen=True)
class Compiled:
    case: Case
    config: str
    shared: int | None  # bytes; None when it did not compile
    kept: bool  # the pruning keeps it at Mixtral's sizes
    error: str = ""


# Mixtral 8x7B's sizes; a step of T tokens sends N = T x K rows.
D, I, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, E, K, T = 4096, 14336, 32, 8, 128, 16, 8, 2, 256
N = T * K
QKV_ROW = (HEADS + 2 * KV_HEADS) * HEAD_DIM  # q, k and v are views of one projection's rows


@dataclass(frozen=True)
class KernelArgs:
    """A kernel and what a serving launch at Mixtral's sizes passes it, besides its tile constants."""

    module: str
    name: str
    pointers: dict[str, str]  # pointer arguments not of the step's dtype -> Triton type
    integers: dict[str, int]  # integer arguments (Triton makes a 1 a constant, and marks multiples of 16)
    tiles: dict[str, object]  # the constexprs a kernel with fixed tiles is launched with (none for autotuned ones)


KERNELS = {
    "gate_up": KernelArgs("expert_ffn", "_gate_up_kernel",
        {"blocks_ptr": "*i64", "offsets_ptr": "*i64"},
        dict(D=D, I=I, stride_xn=D, stride_1e=I * D, stride_1i=D, stride_1d=1, stride_3e=I * D, stride_3i=D, stride_3d=1,
             stride_hn=I), {}),
    "down": KernelArgs("expert_ffn", "_down_kernel",
        {"blocks_ptr": "*i64", "offsets_ptr": "*i64"},
        dict(D=D, I=I, stride_hn=I, stride_2e=D * I, stride_2d=I, stride_2i=1, stride_on=D), {}),
    "attention": KernelArgs("paged_attention", "_paged_attention_kernel",
        {"tables_ptr": "*i32", "programs_ptr": "*i64", "query_starts_ptr": "*i64", "query_lens_ptr": "*i64",
         "start_pos_ptr": "*i64"},
        dict(stride_qt=HEADS * HEAD_DIM, stride_qh=HEAD_DIM, stride_ks=KV_HEADS * HEAD_DIM, stride_kh=HEAD_DIM,
             stride_vs=KV_HEADS * HEAD_DIM, stride_vh=HEAD_DIM, stride_ot=HEADS * HEAD_DIM, stride_oh=HEAD_DIM,
             stride_tb=129, window=0, block_size=BLOCK_SIZE, head_dim=HEAD_DIM), {}),
    "route": KernelArgs("route", "_route_kernel", {"weights_ptr": "*fp32", "ids_ptr": "*i32"},
        dict(T=T, E=E, K=K, stride_lt=E, stride_wt=K, stride_it=K, stride_wk=1, stride_ik=1),
        dict(BLOCK_T=T, BLOCK_E=E, BLOCK_K=K, NORMALIZE=True)),
    "gather": KernelArgs("permute", "_gather_rows_kernel", {"index_ptr": "*i64"},
        dict(N=N, D=D, stride_src=D, stride_out=D), dict(BLOCK_N=16, BLOCK_D=256)),
    "combine": KernelArgs("combine", "_combine_kernel", {"w_ptr": "*fp32", "slot_ptr": "*i64"},
        dict(T=T, D=D, K=K, stride_x=D, stride_wt=K, stride_wk=1, stride_st=K, stride_sk=1, stride_out=D),
        dict(BLOCK_T=16, BLOCK_D=256)),
    "rms_norm": KernelArgs("rms_norm", "_rms_norm_kernel", {},
        dict(R=T, D=D, stride_xr=D, stride_w=1, stride_or=D), dict(BLOCK_R=1, BLOCK_D=D)),
    "rotary": KernelArgs("rotary", "_rotary_kernel", {},
        dict(H=HEADS, HALF=HEAD_DIM // 2, stride_xt=QKV_ROW, stride_xh=HEAD_DIM,
             stride_ct=HEAD_DIM, stride_st=HEAD_DIM, stride_ot=HEADS * HEAD_DIM, stride_oh=HEAD_DIM),
        dict(BLOCK_H=HEADS, BLOCK_HALF=HEAD_DIM // 2)),
    "rotary_store": KernelArgs("rotary_store", "_rotary_store_kernel", {"slots_ptr": "*i64"},
        dict(H=HEADS, HKV=KV_HEADS, HALF=HEAD_DIM // 2, stride_qt=QKV_ROW, stride_qh=HEAD_DIM, stride_kt=QKV_ROW,
             stride_kh=HEAD_DIM, stride_vt=QKV_ROW, stride_vh=HEAD_DIM, stride_ct=HEAD_DIM, stride_st=HEAD_DIM,
             stride_ot=HEADS * HEAD_DIM, stride_oh=HEAD_DIM, stride_kcs=KV_HEADS * HEAD_DIM, stride_kch=HEAD_DIM,
             stride_vcs=KV_HEADS * HEAD_DIM, stride_vch=HEAD_DIM),
        dict(BLOCK_HQ=HEADS, BLOCK_HKV=KV_HEADS, BLOCK_HALF=HEAD_DIM // 2)),
}  # fmt: skip
AUTOTUNED = ("gate_up", "down", "attention")


@dataclass(frozen=True)
class LaunchSpec:
    fn: object  # the kernel's JITFunction
    signature: dict[str, str]
    constants: dict[str, object]  # integer arguments Triton turns into constants (those equal to 1)
    attrs: dict[tuple[int], list]  # the arguments marked divisible by 16 (pointers: aligned to 16 bytes)


def launch_spec(kernel: str, dtype: str) -> LaunchSpec:
    """What Triton sees of a serving launch of ``kernel`` at Mixtral's sizes: argument types, constants, alignment."""
    args = KERNELS[kernel]
    fn = getattr(importlib.import_module(f"moeshard.kernels.{args.module}"), args.name)
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = args.pointers.get(name, "*" + TYPES[dtype])
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "eps"):
            signature[name] = "fp32"
        elif args.integers[name] == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if args.integers[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return LaunchSpec(fn, signature, constants, attrs)


FIXED_TILES = triton.Config({}, num_warps=4, num_stages=3)  # Triton's launch defaults


def _configs(kernel: str) -> list[triton.Config]:
    tuning = importlib.import_module("moeshard.kernels.tuning")
    if kernel not in AUTOTUNED:
        return [FIXED_TILES]
    return tuning.ATTENTION_CONFIGS if kernel == "attention" else tuning.GEMM_CONFIGS


def _kept(case: Case, config: triton.Config) -> bool:
    """Whether the pruning times this configuration at Mixtral's sizes on the case's part."""
    tuning = importlib.import_module("moeshard.kernels.tuning")
    if case.kernel not in AUTOTUNED:
        return True
    itemsize = 2 if case.dtype == "bfloat16" else 4
    part = tuning.GpuPart(case.arch, SHARED_LIMIT[case.arch] - tuning.SCRATCH)
    if case.kernel == "attention":
        return tuning.attention_fits(config, case.block_m, HEAD_DIM, itemsize, part)
    out, reduce, operands = (I, D, 2) if case.kernel == "gate_up" else (D, I, 1)
    return tuning.gemm_fits(config, case.block_m, out, reduce, itemsize, operands, part)


def compile_case(case: Case) -> Compiled:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = _configs(case.kernel)[case.config_index]
    spec = launch_spec(case.kernel, case.dtype)
    fn = spec.fn
    constants = {**KERNELS[case.kernel].tiles, **config.kwargs, **spec.constants}
    if case.kernel in AUTOTUNED:
        constants.update(BLOCK_M=case.block_m, DOT_FP32=False, PRECISION=case.precision)
    rounding = importlib.import_module("moeshard.kernels.rounding").rounding_code(getattr(torch, case.dtype))
    constants.update({name: rounding for name in ("ROUND", "ROUND_X", "ROUND_OUT") if name in fn.arg_names})
    if case.kernel == "attention":
        group = HEADS // KV_HEADS
        constants.update(GROUP=group, QUERIES=max(1, case.block_m // group), SLIDING=False, BLOCK_D=HEAD_DIM)
    tiles = config.kwargs or {k: v for k, v in KERNELS[case.kernel].tiles.items() if k.startswith("BLOCK")}
    described = ", ".join(f"{k}={v}" for k, v in tiles.items()) + f", warps={config.num_warps}, stages={config.num_stages}"
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
    for kernel in KERNELS:
        for arch in archs:
            for dtype, precision in (DOTS[d] for d in dots):
                if kernel not in AUTOTUNED:
                    if precision == "ieee":  # no dot in them: one build per dtype
                        cases.append(Case(kernel, arch, dtype, precision, 0, 0))
                    continue
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
            f"| {limit // 1024} | {fits} | {('yes' if r.kept else 'no') if c.kernel in AUTOTUNED else 'fixed tiles'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--block-m", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dots", nargs="+", choices=sorted(DOTS), default=["bfloat16", "float32", "tf32"])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--kept-only", action="store_true", help="only the configurations the pruning keeps")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.execve(sys.executable, [sys.executable, "-m", "moeshard.kernels.benchmarks.compile_configs", *(argv or sys.argv[1:])],
                  {**os.environ, "TRITON_INTERPRET": "0"})  # fmt: skip
    cases = [c for c in all_cases(args.archs, args.block_m, args.dots, args.kept_only) if c.kernel in args.kernels]
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
