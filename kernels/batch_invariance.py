"""Batch invariance: a row's results do not depend on the rows that share its batch (``batch_invariant=True``).

Without it, what else runs in a step moves a request's numbers in the last bits: a product's kernel is chosen
by its row count (oneDNN and the BLAS pick other blockings, so other summation orders, for 1, 5 or 40 rows),
and a masked SDPA over keys padded to the step's longest history sums a query's tail in another order for
each padded length. Greedy decoding then turns a last-bit difference on a near tie into another token, so
the same prompt can get another answer under load (docs/reliability.md). While the mode is on:

- every product (``kernels/linear.py``) runs on tiles of exactly ROW_TILE rows, zeros past the last row, so
  every row meets the one kernel of that row count, whatever its batch; a row's place in a tile does not
  change its sums (tested);
- attention computes every query, decode or prefill, as a query of its own over the keys from position 0,
  padded with masked keys to a multiple of KEY_MULTIPLE, with two batched products and a softmax, not SDPA
  (``kernels/paged_attention.py``, ``attention_by_products``): a query's result is then the same in any
  batch, in any prefill chunk, from the prefix cache or computed afresh.

Measured on the CPU (x86, AVX-512 and AVX2); the other ops of a step (norms, softmax, top-k,
embedding, rotary, the int8 experts) already give a row the same result in any batch. It costs speed (small
tiles for large products, every masked key computed): docs/kernels.md, "Batch invariance".

The mode is process-wide while set (``batch_invariant``, around a forward pass or an expert actor's batch),
so that threads sharing out a layer's experts see it too.

Dimensions: N rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

ROW_TILE = 16  # rows of every product while the mode is on
KEY_MULTIPLE = 16  # keys of every attention call are padded to a multiple of this

_enabled = False


def batch_invariant_now() -> bool:
    """Whether products and attention run batch invariant at this moment."""
    return _enabled


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Run the block batch invariant when ``enabled`` (else as it is); the previous mode comes back after."""
    global _enabled
    before, _enabled = _enabled, enabled or _enabled
    try:
        yield
    finally:
        _enabled = before


def tiles_of(rows: int) -> int:
    """ROW_TILE-row tiles that hold ``rows`` rows."""
    return -(-rows // ROW_TILE)


def padded_keys(keys: int) -> int:
    """``keys`` rounded up to a multiple of KEY_MULTIPLE."""
    return -(-keys // KEY_MULTIPLE) * KEY_MULTIPLE
