"""int8 products for expert weights (``quantization="experts_int8"``): 8-bit weights, 8-bit activations per row.

    weight[o, k] ~ values[o, k] * scales[o]       (values int8, symmetric, one scale per output channel)
    x[n, k]      ~ q[n, k] * row_scales[n]        (q int8, symmetric, one scale per row, at every call)
    out[n, o]    = (sum_k q[n, k] * values[o, k]) * scales[o] * row_scales[n]

The sums are over integers (int32), so they are exact whatever order a kernel adds them in, and each row's
scale is its own: a row's output depends on that row alone, never on the rows beside it or the row count. So
the sharded path (other groupings of rows) gives the single process's numbers exactly, as in float.

On the CPU the product runs through oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise``, the op torch's
own compiler emits for x86 int8) on the weight prepacked for it at load: on the demo model's expert shapes it reads
the weights at 8.5 GB/s from 1 to 16 rows on one core, and with the rows' quantization around it an expert runs
1.27-1.48x as fast as prepacked bfloat16 at 1-32 rows, level at 64 (docs/performance.md, "8-bit experts"). Elsewhere (a torch without that op, or ``pack=False``) the same sums go
through ``torch._int_mm``, which is also exact: both give the same integers.

Dimensions: N rows, K in features, O out features.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moeshard.kernels.linear import padded_rows

logger = logging.getLogger(__name__)

# oneDNN's int8 linear and its weight packing: private ops, None where this torch lacks them.
_QLINEAR = getattr(torch.ops.onednn, "qlinear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_QPREPACK = getattr(torch.ops.onednn, "qlinear_prepack", None) if _QLINEAR is not None else None

INT8_MAX = 127


@dataclass(frozen=True, eq=False)  # compared and hashed by identity, as tensors are
class Int8Weight:
    """A weight [O, K] as int8 values and a float32 scale per output channel."""

    values: torch.Tensor  # [O, K] int8, or the same prepacked for oneDNN (opaque, [K, O])
    scales: torch.Tensor  # [O] float32
    zero_points: torch.Tensor  # [O] int64 zeros (oneDNN takes them; symmetric quantization has none)

    @property
    def packed(self) -> bool:
        return self.values.is_mkldnn

    @property
    def shape(self) -> torch.Size:
        """[O, K], as the float weight's."""
        return torch.Size((self.scales.shape[0], self.values.shape[0] if self.packed else self.values.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()


def onednn_int8_available() -> bool:
    """Whether this torch has oneDNN's int8 linear and it sums exactly on this CPU (``onednn_int8_exact``)."""
    return _QPREPACK is not None and onednn_int8_exact()


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear gives the exact integer sums here. Without VNNI (an AVX2 part: no AVX512-VNNI,
    no AVX-VNNI, no AMX) it multiplies bytes in pairs into 16-bit sums (``vpmaddubsw``), which saturate: on one
    such machine its products were 20% off ``torch._int_mm``'s. Checked once, on the largest products there are
    (every value 127, where a pair's sum reaches 2 x 255 x 127, past the 16-bit range); where it fails the int8
    products go through ``torch._int_mm``."""
    if _QPREPACK is None:
        return False
    k = 64
    values = torch.full((1, k), INT8_MAX, dtype=torch.int8)  # [1, K]
    weight = _QPREPACK(torch.full((16, k), INT8_MAX, dtype=torch.int8), None)  # [16, K] packed
    scales = torch.ones(16)
    out = _QLINEAR(values, 1.0, 0, weight, scales, torch.zeros(16, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
    exact = bool((out == INT8_MAX * INT8_MAX * k).all())
    if not exact:
        logger.warning("oneDNN's int8 linear is not exact on this CPU (no VNNI): int8 products run through torch._int_mm")
    return exact


def quantize_weight(weight: torch.Tensor, pack: bool = True) -> Int8Weight:
    """weight [O, K] (any float dtype, on the CPU) -> int8 per output channel: each channel's largest magnitude
    maps to 127. Prepacked for oneDNN when ``pack`` and this torch has oneDNN's int8 linear."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # [O]
    values = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # [O, K]
    if pack and onednn_int8_available():
        values = _QPREPACK(values, None)
    return Int8Weight(values, scales, torch.zeros_like(scales, dtype=torch.long))


def dequantize_weight(weight: Int8Weight) -> torch.Tensor:
    """-> float32 [O, K], the weight the int8 values stand for (the plain values only)."""
    assert not weight.packed, "a prepacked weight keeps no plain values"
    return weight.values.float() * weight.scales[:, None]


class QuantizedRows(NamedTuple):
    values: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N, 1] float32: x[n, k] ~ values[n, k] * scales[n]


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """x [N, K] -> int8 per row: each row's largest magnitude maps to 127 (a zero row stays zero)."""
    largest = x.abs().amax(dim=1, keepdim=True).float().clamp_min_(torch.finfo(torch.float32).tiny)  # [N, 1]
    values = torch.mul(x, INT8_MAX / largest).round_().to(torch.int8)  # |x * 127 / largest| <= 127 before rounding
    return QuantizedRows(values, largest / INT8_MAX)


def int8_product(q: QuantizedRows, weight: Int8Weight) -> torch.Tensor:
    """The product of quantized rows [N, K] and weight [O, K]^T -> float32 [N, O], row scales not yet applied:
    out[n, o] = (sum_k q.values[n, k] * weight.values[o, k]) * weight.scales[o]. oneDNN is called on
    ``padded_rows(N)`` rows (zeros past N), as the float products are (kernels/linear.py): it builds a kernel
    per row count, at ~1 ms each for an expert's three products."""
    if not weight.packed:
        return torch._int_mm(q.values, weight.values.t()).float().mul_(weight.scales)
    n, k = q.values.shape
    rows = padded_rows(n)
    values = q.values if rows == n else torch.cat([q.values, q.values.new_zeros(rows - n, k)])  # [rows, K]
    # the input's scale passed as 1: its row scales are the caller's to apply
    out = _QLINEAR(values, 1.0, 0, weight.values, weight.scales, weight.zero_points, None, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
    return out[:n]  # [N, O]


def int8_linear(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x [N, K] (float) @ weight^T -> [N, O] in x's dtype (see the module docstring)."""
    assert x.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    q = quantize_rows(x)
    return torch.mul(int8_product(q, weight), q.scales).to(x.dtype)


def int8_expert_rows(
    x: torch.Tensor, w1: Int8Weight, w3: Int8Weight, w2: Int8Weight, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [n, D] through one int8 expert (w1/w3 [I, D], w2 [D, I]) -> [n, D] in x's dtype, into ``out`` when given.

    x is quantized once for gate and up; their SwiGLU runs in float32 and is quantized again for down. The up
    projection's row scales are not applied to the SwiGLU: quantizing per row does not depend on a row's scale,
    so they are folded into the down projection's row scales instead (one pass over [n, I] less)."""
    q = quantize_rows(x)
    gate = int8_product(q, w1).mul_(q.scales)  # [n, I], as silu needs it
    h = F.silu(gate, inplace=True).mul_(int8_product(q, w3))  # [n, I]: the SwiGLU over each row's scale
    qh = quantize_rows(h)
    if out is None:
        out = torch.empty_like(x)
    return torch.mul(int8_product(qh, w2), qh.scales * q.scales, out=out)  # [n, D], rounded once to out's dtype
