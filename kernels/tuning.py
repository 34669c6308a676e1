"""tuning: launch configurations for the Triton kernels that multiply (grouped SwiGLU, paged attention).

On a GPU each such kernel runs through ``triton.autotune`` over a small set of tile shapes, warp counts
and pipeline depths meant for A100/H100-class parts: the first call for a key (the sizes that decide the
tiles, the row block, the dtypes) times every configuration that fits and keeps the fastest, later calls
reuse it. The configurations are pruned first: a tile wider than the padded dimension it covers, or one
whose pipelined operand buffers would overflow shared memory, is never timed. ``MOESHARD_AUTOTUNE=0`` keeps
the first configuration that fits instead of timing them (``autotuning``).

Under Triton's CPU interpreter the same autotuner runs, but pruning hands back one fixed configuration,
so nothing is timed: recent Triton (3.9) skips timing a lone configuration, and where an older one (3.6)
still times it, the autotuner's benchmark (``autotune_bench``) returns at once under the interpreter, which
has no GPU driver to time with. The interpreter pays per operation more than per element, so its tiles are
as wide as the dimensions allow.

Float32 operands multiply in TF32 on the tensor cores when torch's own matmul precision allows it
(``torch.set_float32_matmul_precision("high")`` or ``"medium"``), so the kernels follow the same policy as
cuBLAS; the default, ``"highest"``, keeps IEEE float32. bfloat16 operands go to ``tl.dot`` as they are,
with float32 accumulation, except under the interpreter (``DOT_FP32``, see ``expert_ffn.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton

from moeshard.kernels.backend import triton_interprets

logger = logging.getLogger(__name__)

A100_SHARED_MEMORY = 163 * 1024  # bytes of shared memory a block may take on an A100 (an H100: 227 KiB)
A100_ARCH = 80
SCRATCH = 4 * 1024  # what a kernel takes beyond its operand buffers (layout conversions, reductions), at most
# The autotuner's choice per key goes to Triton's on-disk cache beside the compiled kernels (keyed by Triton's
# version, the GPU architecture, the kernel's source and the configurations left after pruning), so a restarted
# engine or expert actor times nothing it timed before. Triton turns it off under the interpreter.
KEEP_TIMINGS = True

Pruner = Callable[..., list[triton.Config]]

AUTOTUNE_ENV_VAR = "MOESHARD_AUTOTUNE"


def autotuning() -> bool:
    """Whether a GPU times the configurations that fit a key: yes, unless ``MOESHARD_AUTOTUNE=0``, which keeps the
    first that fits (a faster start, at that tile's speed: e.g. for the GPU tests, which check values, not speed).
    This module is the only place that reads it."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() != "0"


def to_time(fitting: list[triton.Config]) -> list[triton.Config]:
    """Of the configurations that fit a key, those the autotuner is to time: all, or the first (``autotuning``)."""
    return fitting if autotuning() else fitting[:1]


def autotune_bench(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The autotuner's benchmark (its ``do_bench``): the active GPU driver's on a GPU. Under the interpreter the
    pruning leaves one configuration, which older Triton (3.6) still times; there it is not run (the launch that
    follows runs it) and every quantile is 0."""
    if triton_interprets():
        return [0.0] * len(quantiles)
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


# Triton's autotuner keeps each call's arguments on the kernel object while it picks a configuration, so two
# threads launching one autotuned kernel at once (an expert actor serving two coordinators) could read each
# other's. Every launch of an autotuned kernel holds this lock; a launch only queues work on the GPU.
AUTOTUNED_LAUNCH = threading.Lock()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: "tf32" for float32 on a GPU when torch's matmul
    precision is not "highest", else "ieee" (bfloat16 and float16 products are exact either way)."""
    if dtype != torch.float32 or triton_interprets():
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def gemm_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per block of a grouped GEMM: ``rows_per_expert_block`` on a GPU, 64 under the interpreter."""
    return 64 if triton_interprets() else rows_per_expert_block(num_rows, num_experts)


def rows_per_expert_block(num_rows: int, num_experts: int) -> int:
    """About the rows an expert gets, 16..64 (16 is ``tl.dot``'s least), so a decode step's few rows per
    expert do not pad to 64."""
    rows_per_expert = triton.cdiv(max(num_rows, 1), max(1, min(num_experts, num_rows)))
    return max(16, min(64, triton.next_power_of_2(rows_per_expert)))


# [BLOCK_N, BLOCK_K], warps, stages: wide tiles for prefill, narrow N (more programs) and deep pipelines for
# the few rows of decode, where the weights' bandwidth is the bound.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in [
        (32, 128, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 4),
        (128, 64, 4, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 3),
    ]
]


def interpreter_gemm_tiles(out_dim: int, reduce_dim: int) -> dict[str, int]:
    """The interpreter's [BLOCK_N, BLOCK_K]: the padded dimensions, 16..128."""
    return {
        "BLOCK_N": max(16, min(128, triton.next_power_of_2(out_dim))),
        "BLOCK_K": max(16, min(128, triton.next_power_of_2(reduce_dim))),
    }


class GpuPart(NamedTuple):
    """What the pruning needs to know of a GPU: its architecture (80 for sm_80) and the shared memory a block may
    take, less the kernels' scratch."""

    arch: int
    shared_budget: int


@functools.cache
def gpu_part(device_index: int = 0) -> GpuPart:
    """This GPU's part (an A100's when the driver cannot say)."""
    try:
        limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
        major, minor = torch.cuda.get_device_capability(device_index)
    except Exception as exc:  # no driver to ask: assume the smaller of the parts the configurations are for
        logger.debug("GPU part unknown (%s): assuming an A100", exc)
        return GpuPart(A100_ARCH, A100_SHARED_MEMORY - SCRATCH)
    return GpuPart(10 * major + minor, limit - SCRATCH)


def pipeline_buffers(num_stages: int, arch: int) -> int:
    """The operand buffers in shared memory that Triton's software pipeline keeps for a grouped GEMM of
    ``num_stages``: one fewer than the stages before Hopper (exactly what every sm_80 binary of
    ``benchmarks/compile_configs.py`` takes), as many from Hopper on (an upper bound for sm_90's)."""
    return num_stages if arch >= 90 else max(1, num_stages - 1)


def gemm_fits(
    config: triton.Config, block_m: int, out_dim: int, reduce_dim: int, itemsize: int, operands: int, part: GpuPart
) -> bool:
    """Whether a grouped GEMM configuration is worth timing: its tiles no wider than the padded dimensions, and
    the pipeline's buffers of a row tile and ``operands`` weight tiles within the part's shared memory."""
    n, k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    if n > max(16, triton.next_power_of_2(out_dim)) or k > max(16, triton.next_power_of_2(reduce_dim)):
        return False
    buffers = pipeline_buffers(config.num_stages, part.arch)
    return buffers * (block_m * k + operands * k * n) * itemsize <= part.shared_budget


def gemm_pruner(out_arg: str, reduce_arg: str, rows_arg: str, weight_operands: int) -> Pruner:
    """The pruning for a grouped GEMM kernel whose output width, reduction length and rows tensor are the
    arguments named; ``weight_operands`` weight tiles are loaded per step (2 for gate and up)."""

    def prune(configs: Sequence[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        out_dim, reduce_dim = named_args[out_arg], named_args[reduce_arg]
        if triton_interprets():
            return [triton.Config(interpreter_gemm_tiles(out_dim, reduce_dim))]
        rows = named_args[rows_arg]
        fits = functools.partial(
            gemm_fits, block_m=kwargs["BLOCK_M"], out_dim=out_dim, reduce_dim=reduce_dim, itemsize=rows.element_size(),
            operands=weight_operands, part=gpu_part(rows.device.index or 0),
        )  # fmt: skip
        kept = to_time([c for c in configs if fits(c)])
        n_cap, k_cap = max(16, triton.next_power_of_2(out_dim)), max(16, triton.next_power_of_2(reduce_dim))
        return kept or [triton.Config({"BLOCK_N": min(32, n_cap), "BLOCK_K": min(64, k_cap)}, num_warps=4, num_stages=2)]

    return prune


# BLOCK_N key positions per step, warps, stages; BLOCK_M (queries) comes from the chunk lengths.
ATTENTION_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
    for n, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3)]
]

INTERPRETER_ATTENTION_BLOCK_N = 64


def attention_fits(config: triton.Config, block_m: int, block_d: int, itemsize: int, part: GpuPart) -> bool:
    """Whether a paged-attention configuration's query tile and ``num_stages`` key and value tiles fit the part's
    shared memory. Unlike the GEMMs' this estimate does not follow the architecture: the binaries for sm_80 take
    less than it says, those for sm_90 up to 1 KiB more (within ``SCRATCH``)."""
    return (block_m + config.num_stages * 2 * config.kwargs["BLOCK_N"]) * block_d * itemsize <= part.shared_budget


def prune_attention(configs: Sequence[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """One fixed key block under the interpreter; on a GPU the configurations whose tiles fit shared memory."""
    if triton_interprets():
        return [triton.Config({"BLOCK_N": INTERPRETER_ATTENTION_BLOCK_N})]
    keys = named_args["k_ptr"]
    part = gpu_part(keys.device.index or 0)
    kept = to_time([c for c in configs if attention_fits(c, kwargs["BLOCK_M"], kwargs["BLOCK_D"], keys.element_size(), part)])
    return kept or [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)]
