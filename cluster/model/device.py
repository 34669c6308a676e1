"""Where the coordinator's tensors live and in which precision: ``device`` and ``dtype`` settings resolved on this machine.

``auto`` is decided where the model runs (the Serve replica or the offline process, each expert actor for
itself), not where the config was written: CUDA when this process sees a GPU, else the CPU; bfloat16 on a
GPU, float32 on the CPU (exact against float32 references; Triton has no bf16 atomics there). On a CPU with
native bfloat16 (AVX512-BF16 or AMX), ``dtype="bfloat16"`` is the faster choice: its weights are prepacked
for oneDNN too (``kernels/linear.py``), at half the bytes.
"""

from __future__ import annotations

import logging

import torch

from moeshard.cluster.choices import DTYPE_CHOICES, DTYPE_NAMES, check_device_name

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting on this machine; asking for CUDA without one is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but this process sees no CUDA GPU (use 'auto' or 'cpu')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} was asked for, but this process sees {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a ``dtype`` setting: ``auto`` is bfloat16 on a GPU and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]
