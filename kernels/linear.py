"""linear: x @ weight^T (+ bias), the projection every layer of the model runs.

    out[n, o] = sum_k x[n, k] * weight[o, k] (+ bias[o])

Dimensions: N rows, K in features, O out features.

On CPU in float32, with a weight of at least LARGE_WEIGHT elements, it does not call
``F.linear`` (the CPU BLAS), which reads the weight far below the memory's bandwidth at these shapes:

- at most SMALL_ROWS rows, as in a decode step of few sequences, it computes
  out^T = weight @ x^T instead of x @ weight^T: the same sums, but the BLAS takes a path
  for the short, wide right-hand side that reads the weight 1.2-3.9x faster. A single row
  is passed as two, since torch sends [O, K] @ [K, 1] to a matrix-vector product that is
  as slow as the other order. A weight that narrows (O < K, e.g. an FFN's down
  projection) takes the next route instead: in this order it was as fast at best, and from
  3 rows on up to 1.6x slower;
- otherwise it calls oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op
  torch's own compiler emits for CPU linears), up to 2.4x faster than ``F.linear`` from 5 rows
  to prefill chunks (measured to 1024 rows).

The bounds hold on one thread (as in Ray's workers) and on two (docs/performance.md,
"Projections on CPU"; ``python -m moeshard.kernels.benchmarks.linear --routes``).

Small weights (the per-call cost dominates), other devices and dtypes, and a torch
without that op call ``F.linear``.

Prepacked weights. ``prepack(weight)`` copies a weight into oneDNN's own blocked layout once, at load
(as torch's compiler and vLLM's CPU backend do); ``linear`` then sends every row count through oneDNN's
linear on it. On the demo model's shapes that is up to 1.7x the plain-weight routes from 4 rows on
(1.4-1.5x at 8-16 rows, 1.0-1.1x at 512); at 1-2 rows the plain routes stay faster. A whole decode
step in one process came out level at one sequence (0.97x) and 1.21-1.30x at 16-64
(docs/performance.md, "Prepacked weights"). The packed copy replaces the plain weight, so the memory
stays the same. It is an opaque tensor (no storage, not picklable); ``unpack`` gives the plain weight
back, exactly. ``prepacks(device, dtype)`` says where weights are packed: on the CPU with the torch
backend, in float32, and in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX,
``PACKED_DTYPES``); unless ``MOESHARD_PREPACK=0`` (for A/B measurements; this module is the only place
that reads it).

Row counts. oneDNN builds a kernel (a primitive) for each row count it meets and keeps 1024 in a cache;
building one costs 5-8x the product (prefill chunks and expert groups bring new counts almost every call).
Above EXACT_ROWS rows (a decode step's counts stay exact) the input is padded with zero rows to one of 8
counts per doubling (``padded_rows``), at most 12.5% more rows: prefill of 48 prompts in bfloat16 ran 1.9x
faster (docs/performance.md, "oneDNN kernels per row count").

bfloat16. oneDNN's linear on a packed bfloat16 weight multiplies in bfloat16 and accumulates in float32,
as ``F.linear`` does; it reads half the bytes of float32, and a whole decode step of 1-64 sequences ran
1.3-1.4x faster than packed float32 on the demo model (docs/performance.md, "bfloat16 on CPU").
Without native bfloat16 (AVX2 machines), oneDNN would emulate it, so bfloat16 weights stay plain there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.batch_invariance import ROW_TILE, batch_invariant_now, tiles_of

SMALL_ROWS = 4  # from 5 rows on, oneDNN's linear is as fast as weight @ x^T or faster
LARGE_WEIGHT = 1 << 18  # elements (1 MiB in float32): below it the call's fixed cost dominates
PACK_MIN_WEIGHT = 1 << 16  # elements: smaller weights (a router) stay plain, oneDNN's call costs more than it saves
PREPACK_ENV_VAR = "MOESHARD_PREPACK"
EXACT_ROWS = 64  # up to this many rows (a decode step's) oneDNN sees the row count as it is
ROW_STEPS_PER_OCTAVE = 8  # above it, row counts are padded up to one of 8 steps per doubling (<= 12.5% more rows)

# oneDNN's linear, on plain or prepacked weights; a private op: None where this torch lacks it.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

Route = Literal["weight_first", "onednn", "plain"]


def _packed_dtypes() -> frozenset[torch.dtype]:
    if _ONEDNN_LINEAR is None:
        return frozenset()
    native_bfloat16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX512-BF16 or AMX
    return frozenset({torch.float32, torch.bfloat16} if native_bfloat16 else {torch.float32})


PACKED_DTYPES = _packed_dtypes()  # the dtypes whose weights are prepacked on this machine


def prepacks(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` on ``device`` are prepacked at load (see the module docstring)."""
    if os.environ.get(PREPACK_ENV_VAR, "1").strip() == "0":
        return False
    return device.type == "cpu" and dtype in PACKED_DTYPES and resolve_backend("auto", device) == "torch"


def packable(weight: torch.Tensor) -> bool:
    """Whether ``prepack`` packs this weight: a contiguous CPU matrix of PACKED_DTYPES with at least
    PACK_MIN_WEIGHT elements (or one packed already)."""
    if weight.is_mkldnn:
        return True
    plain_matrix = weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
    return plain_matrix and weight.is_contiguous() and weight.numel() >= PACK_MIN_WEIGHT


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """weight [O, K] -> the same weight in oneDNN's layout for ``linear`` (a copy), or ``weight`` itself
    where packing does not pay (``packable``) or is done already."""
    if weight.is_mkldnn or not packable(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """A prepacked weight -> the plain [O, K] weight (exactly); a plain weight as it is."""
    return weight.to_dense() if weight.is_mkldnn else weight


def route_for(x: torch.Tensor, weight: torch.Tensor) -> Route:
    """Which product computes x [N, K] @ weight [O, K]^T (see the module docstring)."""
    if weight.is_mkldnn:
        return "onednn"
    if x.dim() != 2:
        return "plain"
    n, (o, k) = x.shape[0], weight.shape
    cpu_float32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    if not cpu_float32 or n == 0 or weight.numel() < LARGE_WEIGHT:
        return "plain"
    if n <= SMALL_ROWS and o >= k:
        return "weight_first"
    return "onednn" if _ONEDNN_LINEAR is not None and weight.is_contiguous() else "plain"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K], weight [O, K], bias [O] or None -> [N, O] (contiguous)."""
    if batch_invariant_now() and x.dim() == 2 and x.shape[0] > 0:
        return _tiled_product(x, weight, bias)
    return _product(x, weight, bias, route_for(x, weight))


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x [N, K], weight [O, K] -> ``out`` [N, O] (may be a view of a larger buffer)."""
    if batch_invariant_now() and x.shape[0] > 0:
        return out.copy_(_tiled_product(x, weight, None))
    route = route_for(x, weight)
    if route == "plain":
        return torch.mm(x, weight.t(), out=out)
    return out.copy_(_product(x, weight, None, route))


def _tiled_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` in batch-invariant mode (kernels/batch_invariance.py): on tiles of exactly ROW_TILE rows,
    zeros past row N, each through the route and kernel of that row count."""
    n, k = x.shape
    padded = x.new_zeros(tiles_of(n) * ROW_TILE, k)  # [N', K]
    padded[:n] = x
    tiles = padded.split(ROW_TILE)  # [ROW_TILE, K] each
    route = route_for(tiles[0], weight)
    return torch.cat([_product(tile, weight, bias, route) for tile in tiles])[:n]  # [N, O]


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: Route) -> torch.Tensor:
    if route == "plain":
        return F.linear(x, weight, bias)
    if route == "onednn":
        return _onednn_linear(x, weight, bias)
    n = x.shape[0]
    columns = (x if n > 1 else x.expand(2, -1).contiguous()).T  # [K, n'], n' >= 2
    out = (weight @ columns)[:, :n].T.contiguous()  # [O, n'] -> [N, O]
    return out if bias is None else out.add_(bias)


def linear_on_threads(x: torch.Tensor, weight: torch.Tensor, threads: int) -> torch.Tensor:
    """``linear(x, weight)`` with torch's intra-op threads raised to ``threads`` for this product where it goes
    through oneDNN (whose threads share out the outputs, not the sums: the same values on any count, tested);
    other routes run on the caller's threads. Meant for a step's one large product, the LM head, while the cores
    of its expert actors or expert threads wait: on one core a [32, 512] x [512, 32000] float32 LM head took
    19.5 ms, on two 10.0 (docs/performance.md, "The LM head on the idle cores")."""
    if threads <= 1 or batch_invariant_now() or route_for(x, weight) != "onednn":
        return linear(x, weight)
    with intra_op_threads(threads):
        return linear(x, weight)


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Inside, torch's intra-op threads are raised to ``threads`` where there are fewer; the count from before
    again after. torch keeps one count for the process: another thread's ops in that window see it too (an
    engine runs its products on its own thread; its expert threads wait for it meanwhile)."""
    own = torch.get_num_threads()
    if threads <= own:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(own)


def padded_rows(rows: int) -> int:
    """The row count oneDNN's linear is called with for ``rows`` rows: ``rows`` itself up to EXACT_ROWS, then
    rounded up to one of ROW_STEPS_PER_OCTAVE steps per doubling (65 -> 72, 100 -> 104, 1000 -> 1024).

    oneDNN builds a new primitive (a JIT kernel) for each row count it has not seen, at 5-8x the cost of the
    product itself (1.4 against 0.19 ms at 100 rows on a 1536x576 bfloat16 weight), and its cache keeps
    1024 of them; prefill chunks and expert groups bring a new row count almost every call. With the
    steps, a weight shape meets at most EXACT_ROWS + 8 row counts per doubling, built once each.
    """
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << max(0, (rows - 1).bit_length() - ROW_STEPS_PER_OCTAVE.bit_length())  # rows in (2^b, 2^(b+1)]: 2^b / 8
    return -(-rows // step) * step


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [..., O] through oneDNN's linear, called on padded_rows(N) rows (zeros past N)."""
    leading, in_features = x.shape[:-1], x.shape[-1]
    rows_in = x.reshape(-1, in_features)  # [N, K]
    n = rows_in.shape[0]
    rows = padded_rows(n)
    if rows == n:
        rows_in = rows_in.contiguous()
    else:
        padded = rows_in.new_empty(rows, in_features)  # [rows, K]
        padded[:n].copy_(rows_in)
        padded[n:].zero_()
        rows_in = padded
    out = _ONEDNN_LINEAR(rows_in, weight, bias, "none", [], "")  # [rows, O]
    return out[:n].reshape(*leading, out.shape[-1])  # the leading rows of a contiguous result: contiguous
