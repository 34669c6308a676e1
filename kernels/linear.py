"""linear: x @ weight^T (+ bias), the projection every layer of the model runs.

    out[n, o] = sum_k x[n, k] * weight[o, k] (+ bias[o])

Dimensions: N rows, K in features, O out features.

A decode step of few sequences multiplies a few rows by a large weight, a pass that
is bound by reading the weight once. On CPU, for float32 and at most SMALL_ROWS rows,
this computes out^T = weight @ x^T instead of x @ weight^T: the same sums, but the
CPU BLAS takes a path for the short, wide right-hand side that reads the weight
2-4x faster than its path for x @ weight^T at these shapes (docs/performance.md,
"Few rows"). A single row is passed as two, since torch sends [O, K] @ [K, 1] to a
matrix-vector product that is as slow as the other order. Where it measured no
faster, the plain call stays: small weights (the per-call cost dominates), a single
row through a weight that narrows (O < K, e.g. an FFN's down projection), other
devices and dtypes, and more rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_ROWS = 4  # at 8 rows and more the two orders cost about the same, or x @ weight^T wins
LARGE_WEIGHT = 1 << 18  # elements (1 MiB in float32): below it the call's fixed cost dominates


def _weight_first(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, (o, k) = x.shape[0], weight.shape
    if not 0 < n <= SMALL_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return weight.numel() >= LARGE_WEIGHT and (n > 1 or o >= k)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K], weight [O, K], bias [O] or None -> [N, O] (contiguous)."""
    if x.dim() != 2 or not _weight_first(x, weight):
        return F.linear(x, weight, bias)
    n = x.shape[0]
    columns = (x if n > 1 else x.expand(2, -1).contiguous()).T  # [K, n'], n' >= 2
    out = (weight @ columns)[:, :n].T.contiguous()  # [O, n'] -> [N, O]
    return out if bias is None else out.add_(bias)


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x [N, K], weight [O, K] -> ``out`` [N, O] (may be a view of a larger buffer)."""
    if not _weight_first(x, weight):
        return torch.mm(x, weight.t(), out=out)
    return out.copy_(linear(x, weight))
