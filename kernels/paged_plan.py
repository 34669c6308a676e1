"""The torch path's plan of a step's attention, built once per step and read by every layer.

    decode group: the sequences with one query (two or more of them) -> one padded SDPA call
                  over their visible keys, with a key-padding mask: read from the layout's decode
                  mirror where it has one (``decode_mirror.py``: kept from step to step, a step
                  copies in only its new keys), else gathered from the cache (into buffers kept
                  for the step)
    chunks:       every other sequence -> SDPA over its visible keys, read as a view of the cache
                  where its blocks are consecutive (else gathered): without a sliding window,
                  keys before the chunk (its history) are seen by every query and its own keys
                  causally, so no mask is built; with one, a bool mask unless the chunk starts
                  at position 0 and fits in the window

Dimensions: T query rows, Bd sequences in the decode group, Smax their most visible keys,
n one chunk's queries, S its visible keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from moeshard.kernels.decode_mirror import MirrorStep
from moeshard.kernels.host_copy import from_host

if TYPE_CHECKING:
    from moeshard.kernels.paged_layout import PagedLayout


class GatherBuffers:
    """Where the decode group's keys and values are gathered, kept for every layer of the step. A fresh [Bd * Smax,
    Hkv, Dh] tensor a layer costs page faults wherever the CPU allocator hands back new pages (always past 32 MB,
    which glibc maps anew each time): a step's attention ran 0.9-2.3x as fast with kept buffers, surest where a gather
    passes 32 MB (``kernels/benchmarks/decode_gathers.py``, docs/kernels.md). A layer's gathers are read by its
    attention alone, which is done before the next layer gathers."""

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def index_select(self, name: str, cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """cache [slots, ...] at ``index`` [N] -> [N, ...], written over this step's buffer ``name``; in ``dtype``
        if given (converted into a second kept buffer: the float32 copies of a bfloat16 cache's keys)."""
        gathered = torch.index_select(cache, 0, index, out=self._buffer(name, (index.shape[0], *cache.shape[1:]), cache))
        if dtype is None or dtype == cache.dtype:
            return gathered
        return self._buffer(f"{name} as {dtype}", gathered.shape, cache, dtype).copy_(gathered)

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        kept = self._kept.get(name)
        if kept is None or kept.shape != shape or kept.dtype != dtype or kept.device != like.device:
            kept = self._kept[name] = like.new_empty(shape, dtype=dtype)
        return kept


class DecodeGroup(NamedTuple):
    rows: torch.Tensor  # [Bd] int64 query rows in T
    visible: torch.Tensor  # [Bd, 1, 1, Smax] bool, False on padding
    slots: torch.Tensor | None  # [Bd, Smax] int64 cache slot of each visible key, padded with its last (None: mirrored)
    gathered: GatherBuffers | None  # where each layer gathers the keys and values at ``slots``
    mirror: MirrorStep | None  # or where each layer reads them, after copying in the step's new ones


class ChunkPlan(NamedTuple):
    rows: slice  # the chunk's query rows in T
    keys: slice | torch.Tensor  # slots of its visible keys: a slice of the cache (a view), or an index [S]
    history: int  # without mask: every query sees keys[:history], and query i keys[history:history + i + 1]
    mask: torch.Tensor | None  # [n, S] bool (True = may attend), when the window cuts in


class TorchPlan(NamedTuple):
    decode: DecodeGroup | None
    chunks: tuple[ChunkPlan, ...]


def plan_torch(layout: PagedLayout) -> TorchPlan:
    starts = layout.query_starts
    singles = [b for b, n in enumerate(layout.query_lens) if n == 1]
    grouped = set(singles) if len(singles) >= 2 else set()
    chunks = tuple(_plan_chunk(layout, b, slice(starts[b], starts[b + 1])) for b in range(layout.num_seqs) if b not in grouped)
    decode = _plan_decode(layout, sorted(grouped), starts) if grouped else None
    return TorchPlan(decode, chunks)


def _plan_chunk(layout: PagedLayout, b: int, rows: slice) -> ChunkPlan:
    start, n = layout.start_pos[b], layout.query_lens[b]
    end = start + n
    first = layout.first_visible(start)  # no query of the chunk sees a key before this
    span = layout.contiguous_span(b, first, end)
    keys = span if span is not None else layout.slots_of(b, first, end).to(layout.device)
    window = layout.sliding_window
    if window is None or (first == start and n <= window):
        return ChunkPlan(rows, keys, history=start - first, mask=None)
    query_pos = torch.arange(start, end, device=layout.device)[:, None]  # [n, 1]
    key_pos = torch.arange(first, end, device=layout.device)[None, :]  # [1, S]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= query_pos - key_pos < window
    return ChunkPlan(rows, keys, history=0, mask=mask)


def _plan_decode(layout: PagedLayout, members: list[int], starts: tuple[int, ...]) -> DecodeGroup:
    """Each member's one query sees positions first_visible(p) .. p; padded to the longest."""
    mirrored = _plan_mirrored(layout, members, starts)
    if mirrored is not None:
        return mirrored
    firsts = torch.tensor([layout.first_visible(layout.start_pos[b]) for b in members])  # [Bd]
    ends = torch.tensor([layout.start_pos[b] + 1 for b in members])  # [Bd]
    lengths = ends - firsts  # [Bd]
    offsets = torch.arange(int(lengths.max()))[None, :]  # [1, Smax]
    # padding reads a key of its own (its last; masked out)
    positions = torch.minimum(firsts[:, None] + offsets, ends[:, None] - 1)  # [Bd, Smax]
    slots = layout.slots_at(torch.tensor(members)[:, None].expand_as(positions), positions)  # [Bd, Smax]
    visible = offsets < lengths[:, None]  # [Bd, Smax]
    rows = torch.tensor([starts[b] for b in members], dtype=torch.int64)
    device = layout.device
    return DecodeGroup(
        from_host(rows, device), from_host(visible[:, None, None, :], device), from_host(slots, device), GatherBuffers(), None
    )


def _plan_mirrored(layout: PagedLayout, members: list[int], starts: tuple[int, ...]) -> DecodeGroup | None:
    """The group read from the layout's decode mirror, in the mirror's row order; None where it has none, the model
    has a sliding window (a query's keys do not start at 0), or the mirror gathers this step (a group under its
    ``min_keys``, or over its budget)."""
    mirror = layout.decode_mirror
    if mirror is None or layout.sliding_window is not None:
        return None
    step = mirror.plan(
        [layout.seq_ids[b] for b in members],
        [layout.start_pos[b] for b in members],
        lambda member, positions: layout.slots_at(torch.tensor(members)[member], positions),
    )
    if step is None:
        return None
    rows = torch.tensor([starts[members[i]] for i in step.order], dtype=torch.int64)  # [Bd]
    visible = torch.arange(step.width)[None, :] < step.lengths[:, None]  # [Bd, Smax]
    device = layout.device
    return DecodeGroup(from_host(rows, device), from_host(visible[:, None, None, :], device), None, None, step)
