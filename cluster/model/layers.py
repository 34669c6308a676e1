"""Small stateless layers of the decoder: RMSNorm, rotary position embedding, the SwiGLU FFN.

RMSNorm and the rotation are kernels (``kernels/rms_norm.py``, ``kernels/rotary.py``): torch ops on the CPU,
one Triton launch each on a GPU.

Dimensions: T tokens, D hidden, Dh head dim, H heads, I FFN hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeshard.kernels.expert_ffn import expert_rows_torch
from moeshard.kernels.rms_norm import rms_norm
from moeshard.kernels.rotary import rotary

__all__ = ["RotaryEmbedding", "RotaryTables", "apply_rotary", "rms_norm", "swiglu"]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [T, D], gate w1 [I, D], up w3 [I, D], down w2 [D, I] -> w2 @ (silu(w1 @ x) * (w3 @ x)) [T, D]."""
    return expert_rows_torch(x, w1, w3, w2)  # the same SwiGLU as one expert's rows


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # [T, Dh]
    sin: torch.Tensor  # [T, Dh]


class RotaryEmbedding:
    """Default (unscaled) RoPE with the half-split layout of Hugging Face Llama/Mixtral."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.inv_freq = (1.0 / (theta**exponents)).to(device)  # [Dh/2]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """positions [T] -> cos, sin [T, Dh] in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return RotaryTables(cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """x [T, H, Dh] -> [T, H, Dh] rotated by each token's position: x * cos + rotate_half(x) * sin, each element
    rounded as in that expression (``kernels/rotary.py``)."""
    return rotary(x, tables.cos, tables.sin)
