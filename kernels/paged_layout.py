"""Where a step's queries sit in q and where each sequence's keys sit in the paged cache.

A step lays B sequences' new tokens end to end in T rows: sequence b owns rows
``query_starts[b] .. query_starts[b] + query_lens[b] - 1``, at positions
``start_pos[b] ..``. Its keys, positions 0 .. end_pos - 1, live in the cache's
blocks ``block_tables[b]``: position p in slot ``table[p // block_size] * block_size
+ p % block_size``. A block may appear in several tables (a shared prefix, read only).

Query p of a sequence sees key j of the same sequence iff j <= p, and, with a
sliding window W, p - j < W.

One ``PagedLayout`` is built per step and read by every layer: the slots the
step writes, the device tables and program table of the Triton kernel and the
torch path's plan (``paged_plan.py``) are computed once, on first use.

Dimensions: T query rows, B sequences, MB blocks of the longest table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from moeshard.kernels.decode_mirror import DecodeMirror
from moeshard.kernels.host_copy import from_host
from moeshard.kernels.paged_plan import TorchPlan, plan_torch


class DeviceTables(NamedTuple):
    """The layout as tensors, for the Triton kernel."""

    block_tables: torch.Tensor  # [B, MB] int32, physical block ids; 0 past a sequence's blocks
    query_starts: torch.Tensor  # [B] int64 first row of each sequence in T
    query_lens: torch.Tensor  # [B] int64
    start_pos: torch.Tensor  # [B] int64 position of each sequence's first query


@dataclass(frozen=True)
class PagedLayout:
    query_lens: tuple[int, ...]  # [B] queries of each sequence in this step, laid end to end in T
    start_pos: tuple[int, ...]  # [B] position of each sequence's first query (its history before it)
    block_tables: tuple[tuple[int, ...], ...]  # [B][>= ceil(end_pos / block_size)] physical block ids
    block_size: int
    sliding_window: int | None = None
    device: torch.device = torch.device("cpu")
    # The torch path's decode group reads its keys from this mirror, kept from step to step (decode_mirror.py);
    # it needs each sequence's id, stable across steps. None: gathered from the cache every layer.
    decode_mirror: DecodeMirror | None = field(default=None, compare=False, repr=False)
    seq_ids: tuple[int, ...] | None = None  # [B]
    _query_blocks: dict[int, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        assert len(self.query_lens) == len(self.start_pos) == len(self.block_tables), "one entry per sequence"
        assert self.block_size > 0 and (self.sliding_window is None or self.sliding_window > 0)
        for n, start, table in zip(self.query_lens, self.start_pos, self.block_tables):
            assert n > 0 and start >= 0, (n, start)
            assert len(table) * self.block_size >= start + n, f"{len(table)} blocks cannot hold {start + n} positions"
        assert self.decode_mirror is None or self.seq_ids is not None, "a decode mirror needs the sequences' ids"
        assert self.seq_ids is None or len(self.seq_ids) == len(self.query_lens), "one id per sequence"

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def end_pos(self) -> tuple[int, ...]:
        """[B] one past each sequence's last query: its keys are positions 0 .. end_pos - 1."""
        return tuple(s + n for s, n in zip(self.start_pos, self.query_lens))

    @property
    def query_starts(self) -> tuple[int, ...]:
        """[B + 1] row offsets of the sequences in T."""
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        return tuple(starts)

    def first_visible(self, position: int) -> int:
        """The first key position a query at ``position`` sees."""
        return 0 if self.sliding_window is None else max(0, position - self.sliding_window + 1)

    def slots_of(self, b: int, start: int, end: int) -> torch.Tensor:
        """Cache slots [end - start] int64 of positions start .. end - 1 of sequence b."""
        return self.slots_at(torch.full((end - start,), b), torch.arange(start, end))

    @functools.cached_property
    def host_block_tables(self) -> torch.Tensor:
        """[B, MB] int64 on the host, 0 past a sequence's blocks: every sequence's table in one tensor."""
        width = max(1, max((len(t) for t in self.block_tables), default=0))
        padded = [table + (0,) * (width - len(table)) for table in self.block_tables]
        return torch.tensor(padded, dtype=torch.int64).reshape(self.num_seqs, width)

    def slots_at(self, seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots (host int64) of ``positions`` of sequences ``seqs`` (host int64, the same shape): a few
        tensor ops for the whole step, however many sequences it holds."""
        bs = self.block_size
        return self.host_block_tables[seqs, positions // bs] * bs + positions % bs

    def contiguous_span(self, b: int, start: int, end: int) -> slice | None:
        """The slots of positions start .. end - 1 of sequence b as one slice, when its blocks there are consecutive."""
        table, bs = self.block_tables[b], self.block_size
        first, last = start // bs, (end - 1) // bs
        if any(table[i + 1] != table[i] + 1 for i in range(first, last)):
            return None
        begin = table[first] * bs + start % bs
        return slice(begin, begin + end - start)

    @functools.cached_property
    def slot_mapping(self) -> torch.Tensor:
        """[T] int64 cache slot of each query row's own key and value (where the step writes them)."""
        lens = torch.tensor(self.query_lens, dtype=torch.int64)  # [B]
        seqs = torch.repeat_interleave(torch.arange(self.num_seqs), lens)  # [T] each row's sequence
        first_pos = torch.tensor(self.start_pos, dtype=torch.int64) - torch.tensor(self.query_starts[:-1], dtype=torch.int64)
        positions = torch.arange(self.num_tokens) + first_pos[seqs]  # [T] each row's position
        return from_host(self.slots_at(seqs, positions), self.device)

    @functools.cached_property
    def device_tables(self) -> DeviceTables:
        tables = self.host_block_tables.to(torch.int32)  # [B, MB]
        per_seq = torch.tensor([self.query_starts[:-1], self.query_lens, self.start_pos], dtype=torch.int64)  # [3, B]
        per_seq = from_host(per_seq, self.device)
        return DeviceTables(
            block_tables=from_host(tables, self.device),
            query_starts=per_seq[0],
            query_lens=per_seq[1],
            start_pos=per_seq[2],
        )

    def query_blocks(self, block_m: int) -> torch.Tensor:
        """The Triton kernel's program table, [P, 2] int64: each sequence's queries cut into blocks of ``block_m``,
        one program each, as (sequence, first query counted within the sequence's queries). Built on the host from
        the query lengths and copied to the device once per step and block size: one device op."""
        blocks = self._query_blocks.get(block_m)
        if blocks is None:
            table = [(b, first) for b, n in enumerate(self.query_lens) for first in range(0, n, block_m)]
            blocks = from_host(torch.tensor(table, dtype=torch.int64).reshape(-1, 2), self.device)  # [P, 2]
            self._query_blocks[block_m] = blocks
        return blocks

    @functools.cached_property
    def torch_plan(self) -> TorchPlan:
        """The torch path's per-step plan: which sequences share a padded call, views or gathers, masks."""
        return plan_torch(self)
