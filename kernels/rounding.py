"""Rounding inside Triton kernels as torch rounds between its ops.

A torch op on bfloat16 or float16 tensors computes in float32 and rounds its result to nearest-even.
A kernel that follows a torch reference op for op rounds at the same points (``round_as``), so it gives
the reference's values, not a closer but different sum. The GPU's float32 -> bfloat16 cast rounds to
nearest-even, but Triton's CPU interpreter truncates it; the bfloat16 rounding here is done on the bits, the
same on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUNDED_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the ROUND codes ``round_as`` takes


def rounding_code(dtype: torch.dtype) -> int:
    assert dtype in ROUNDED_DTYPES, f"no rounding for {dtype}"
    return ROUNDED_DTYPES[dtype]


@triton.jit
def round_as(x, ROUND: tl.constexpr):
    """x float32 rounded to nearest-even in the dtype ``ROUND`` codes (0 float32, 1 bfloat16, 2 float16), kept
    in float32 (so a store to that dtype is exact)."""
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite values: round the low 16 bits away
        return bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
