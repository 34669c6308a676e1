"""A paged key/value cache with a fixed memory budget.

The pool holds ``num_blocks * block_size`` token slots per layer. A sequence
owns a list of blocks (its block table); position p of the sequence lives in
slot ``table[p // block_size] * block_size + p % block_size``. Blocks are
reserved before a step writes them and returned the moment a sequence ends.

Dimensions: L layers, S slots, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the requested length."""


@dataclass(frozen=True)
class KVCacheUsage:
    used_blocks: int
    total_blocks: int
    block_size: int
    num_sequences: int


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
    ):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.keys = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype)  # [L, S, Hkv, Dh]
        self.values = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype)  # [L, S, Hkv, Dh]
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @classmethod
    def with_budget(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, budget_bytes: int, block_size: int, dtype: torch.dtype
    ) -> "KVCache":
        bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        num_blocks = budget_bytes // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes is below one block ({bytes_per_block} bytes)")
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def blocks_needed(self, seq_id: int, length: int) -> int:
        """Blocks still to be taken for the sequence to hold ``length`` tokens."""
        held = len(self._tables.get(seq_id, ()))
        return max(0, math.ceil(length / self.block_size) - held)

    def can_reserve(self, seq_id: int, length: int) -> bool:
        return self.blocks_needed(seq_id, length) <= len(self._free_blocks)

    def reserve(self, seq_id: int, length: int) -> None:
        """Make the sequence hold at least ``length`` token slots; all or nothing."""
        needed = self.blocks_needed(seq_id, length)
        if needed > len(self._free_blocks):
            raise KVCacheFull(
                f"sequence {seq_id} needs {needed} more KV blocks for {length} tokens; {len(self._free_blocks)} free"
            )
        table = self._tables.setdefault(seq_id, [])
        for _ in range(needed):
            table.append(self._free_blocks.pop())

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table:
            self._free_blocks.extend(reversed(table))

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat slot index [end - start] of positions start..end-1 of a sequence."""
        table = self._tables[seq_id]
        if end > len(table) * self.block_size:
            raise IndexError(f"sequence {seq_id} holds {len(table) * self.block_size} slots, asked for {end}")
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's physical block ids in position order (a copy; a block may be shared, read only)."""
        return list(self._tables[seq_id])

    def usage(self) -> KVCacheUsage:
        return KVCacheUsage(
            used_blocks=self.num_blocks - len(self._free_blocks),
            total_blocks=self.num_blocks,
            block_size=self.block_size,
            num_sequences=len(self._tables),
        )
