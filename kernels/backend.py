"""Which implementation a kernel call runs: Triton or the plain-torch reference.

    backend="auto"   -> Triton on CUDA tensors, torch on CPU tensors
    backend="triton" -> Triton (on CPU tensors only under TRITON_INTERPRET=1)
    backend="torch"  -> the torch reference

The environment variable MOESHARD_KERNEL_BACKEND=torch|triton|auto, when set,
replaces "auto" (an explicit backend argument still wins). This module is the
only place that reads it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch
import triton

logger = logging.getLogger(__name__)

ENV_VAR = "MOESHARD_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch")

Resolved = Literal["triton", "torch"]


@triton.jit
def _probe():
    pass


def triton_interprets() -> bool:
    """True when Triton kernels were built for its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return not isinstance(_probe, triton.runtime.jit.JITFunction)


def tile_rows(row_width: int, num_rows: int) -> int:
    """Rows per program for a kernel whose tile is [rows, row_width] (powers of two).

    The tile holds about 4096 elements on a GPU. The interpreter pays per program
    and per operation rather than per element, so there tiles are 16x larger.
    """
    budget = 65536 if triton_interprets() else 4096
    return max(1, min(budget // row_width, triton.next_power_of_2(max(num_rows, 1))))


@functools.cache
def _log_override(backend: str) -> None:
    logger.info("%s=%s: kernels called with backend='auto' run on %s", ENV_VAR, backend, backend)


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend from {source} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: str, device: torch.device) -> Resolved:
    """The implementation to run for tensors on ``device`` when the caller asked for ``backend``."""
    backend = _check(backend, "the backend argument")
    if backend == "auto":
        backend = _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
        if backend != "auto":
            _log_override(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interprets():
        raise RuntimeError(
            f"the Triton backend got {device.type} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is first imported to run Triton's CPU interpreter"
        )
    return backend
