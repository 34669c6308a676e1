"""A paged key/value cache with a fixed memory budget, and a prefix cache over its full blocks.

The pool holds ``num_blocks * block_size`` token slots per layer. A sequence
owns a list of blocks (its block table); position p of the sequence lives in
slot ``table[p // block_size] * block_size + p % block_size``. Blocks are
reserved before a step writes them and released the moment a sequence ends.

With prefix caching on, every full block a sequence has computed is keyed by
its tokens and all tokens before it (``block_pool``). A new sequence whose
tokens start with known full blocks shares them (read-only: a sequence only
writes positions past what it shares) and starts computing after them; at
least its last prompt token is always computed, since its logits pick the
first new token. Released keyed blocks stay cached until a new block is
needed and none is free, least recently released first. A sequence whose next
full block is being computed right now by another (``n`` > 1 choices, or the
same prompt sent twice at once) waits for it instead of computing it again.

The cache also holds the decode mirrors of the torch path's attention (kernels/decode_mirror.py: the
decoding sequences' keys and values kept contiguous from step to step, one mirror per micro-batch of a step),
up to ``mirror_bytes`` together, and drops a sequence from them when it frees its blocks.

Dimensions: L layers, S slots, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from moeshard.cluster.model.block_pool import BlockHash, BlockPool, block_hashes
from moeshard.kernels.decode_mirror import MIN_KEYS, DecodeMirror
from moeshard.kernels.paged_attention import attention_dtype

logger = logging.getLogger(__name__)


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the requested length."""


@dataclass(frozen=True)
class KVCacheUsage:
    used_blocks: int  # held by a sequence
    total_blocks: int
    block_size: int
    num_sequences: int
    cached_blocks: int = 0  # keyed by the prefix cache, held or not
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0  # of those, tokens found computed


@dataclass(frozen=True)
class AdmissionPlan:
    """What admitting a sequence would take: ``plan_admission``'s answer, ``admit``'s input."""

    cached_blocks: tuple[int, ...]  # its leading blocks already computed, to share
    keys: tuple[BlockHash, ...]  # keys of its full blocks (empty without prefix caching)
    blocks_to_take: int  # blocks it takes out of the available ones (new, plus cached ones nobody holds)
    waits_for_other: bool  # its next full block is being computed by another sequence right now
    query_tokens: int  # tokens looked up, for the hit rate (0 when the cache is not used)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        prefix_caching: bool = True,
        device: torch.device | str = "cpu",
        mirror_bytes: int | None = None,
        mirror_min_keys: int = MIN_KEYS,
    ):
        """``mirror_bytes``: what the decode mirrors may hold together; None: as much as the cache, 0: none.
        ``mirror_min_keys``: a decode group of fewer keys gathers them (``DecodeMirror.min_keys``)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        slots = num_blocks * block_size
        self.device = torch.device(device)
        self.keys = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype, device=device)  # [L, S, Hkv, Dh]
        self.values = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype, device=device)  # [L, S, Hkv, Dh]
        cache_bytes = 2 * self.keys.numel() * self.keys.element_size()
        self.decode_mirrors = self._decode_mirrors(cache_bytes if mirror_bytes is None else mirror_bytes, mirror_min_keys)
        self._pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self._computed_keys: dict[int, list[BlockHash]] = {}  # a sequence's keyed full blocks, from its first
        self._planned: dict[int, list[BlockHash]] = {}  # keys a sequence will compute, not computed yet
        self._computing: dict[BlockHash, int] = {}  # key -> the sequence computing it
        self._query_tokens = 0
        self._hit_tokens = 0

    @classmethod
    def with_budget(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        budget_bytes: int,
        block_size: int,
        dtype: torch.dtype,
        prefix_caching: bool = True,
        device: torch.device | str = "cpu",
        mirror_bytes: int | None = None,
        mirror_min_keys: int = MIN_KEYS,
    ) -> "KVCache":
        bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        num_blocks = budget_bytes // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes is below one block ({bytes_per_block} bytes)")
        return cls(
            num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, prefix_caching, device, mirror_bytes, mirror_min_keys
        )

    def _decode_mirrors(self, budget_bytes: int, min_keys: int) -> tuple[DecodeMirror, ...]:
        """One mirror per micro-batch of a step (two with ping-pong), within ``budget_bytes`` together."""
        if budget_bytes == 0:
            return ()
        _, _, hkv, dh = self.keys.shape
        dtype = attention_dtype(self.keys.dtype, self.device)
        mirrors: list[DecodeMirror] = []

        def held_by_others(mirror_index: int) -> int:
            return sum(m.nbytes for i, m in enumerate(mirrors) if i != mirror_index)

        for index in range(2):
            others = functools.partial(held_by_others, index)
            mirrors.append(DecodeMirror(self.keys.shape[0], hkv, dh, dtype, self.device, budget_bytes, others, min_keys))
        return tuple(mirrors)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take: free ones and cached ones nobody holds."""
        return self._pool.num_available

    def blocks_needed(self, seq_id: int, length: int) -> int:
        """Blocks still to be taken for the sequence to hold ``length`` tokens."""
        held = len(self._tables.get(seq_id, ()))
        return max(0, math.ceil(length / self.block_size) - held)

    def can_reserve(self, seq_id: int, length: int) -> bool:
        return self.blocks_needed(seq_id, length) <= self._pool.num_available

    def reserve(self, seq_id: int, length: int) -> None:
        """Make the sequence hold at least ``length`` token slots; all or nothing."""
        needed = self.blocks_needed(seq_id, length)
        if needed > self._pool.num_available:
            raise KVCacheFull(
                f"sequence {seq_id} needs {needed} more KV blocks for {length} tokens; {self._pool.num_available} free"
            )
        table = self._tables.setdefault(seq_id, [])
        for _ in range(needed):
            table.append(self._pool.take())

    # -- prefix caching -------------------------------------------------------------
    @contextlib.contextmanager
    def prefix_caching_off(self) -> Iterator[None]:
        """While inside, sequences admitted share nothing and key nothing (for work that must see every row)."""
        enabled, self.prefix_caching = self.prefix_caching, False
        try:
            yield
        finally:
            self.prefix_caching = enabled

    def block_keys(self, token_ids: Sequence[int]) -> list[BlockHash]:
        """The prefix-cache keys of ``token_ids``' full blocks."""
        return block_hashes(token_ids, self.block_size, len(token_ids) // self.block_size)

    def plan_admission(self, token_ids: Sequence[int], use_cache: bool = True, keys: list[BlockHash] | None = None) -> AdmissionPlan:
        """How a new sequence over ``token_ids`` would start: which computed blocks it shares, what it takes.
        ``keys``: ``block_keys(token_ids)`` if the caller has them already (a sequence waiting several steps)."""
        bs = self.block_size
        if not self.prefix_caching:
            keys = []
        elif keys is None:
            keys = self.block_keys(token_ids)
        shareable = (len(token_ids) - 1) // bs if use_cache else 0  # the last token is always computed
        cached: list[int] = []
        for key in keys[:shareable]:
            block = self._pool.lookup(key)
            if block is None:
                break
            cached.append(block)
        waits = len(cached) < min(shareable, len(keys)) and keys[len(cached)] in self._computing
        unheld = sum(1 for b in cached if not self._pool.is_held(b))
        return AdmissionPlan(
            cached_blocks=tuple(cached),
            keys=tuple(keys),
            blocks_to_take=math.ceil(len(token_ids) / bs) - len(cached) + unheld,
            waits_for_other=waits,
            query_tokens=len(token_ids) if use_cache and self.prefix_caching else 0,
        )

    def admit(self, seq_id: int, token_ids: Sequence[int], plan: AdmissionPlan) -> int:
        """Give a new sequence its blocks as planned; returns how many of its tokens are already computed."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        if plan.blocks_to_take > self._pool.num_available:
            raise KVCacheFull(f"sequence {seq_id} needs {plan.blocks_to_take} KV blocks; {self._pool.num_available} free")
        for block in plan.cached_blocks:
            self._pool.share(block)
        self._tables[seq_id] = list(plan.cached_blocks)
        self.reserve(seq_id, len(token_ids))
        num_cached = len(plan.cached_blocks)
        self._computed_keys[seq_id] = list(plan.keys[:num_cached])
        planned = [k for k in plan.keys[num_cached:] if k not in self._computing]
        self._planned[seq_id] = planned
        self._computing.update((k, seq_id) for k in planned)
        self._query_tokens += plan.query_tokens
        self._hit_tokens += num_cached * self.block_size
        return num_cached * self.block_size

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Key the sequence's full blocks among its first ``num_computed`` positions, now written."""
        if not self.prefix_caching:
            return
        keys, table = self._computed_keys[seq_id], self._tables[seq_id]
        full = num_computed // self.block_size
        if full <= len(keys):
            return
        parent = keys[-1] if keys else None
        start = len(keys)
        for b, key in enumerate(block_hashes(token_ids[start * self.block_size :], self.block_size, full - start, parent), start):
            self._pool.register(table[b], key)
            keys.append(key)
            if self._computing.get(key) == seq_id:
                del self._computing[key]

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks, last first, so a cached prefix outlives its tails."""
        for key in self._planned.pop(seq_id, ()):
            if self._computing.get(key) == seq_id:
                del self._computing[key]
        self._computed_keys.pop(seq_id, None)
        for mirror in self.decode_mirrors:
            mirror.evict(seq_id)
        for block in reversed(self._tables.pop(seq_id, ())):
            self._pool.release(block)

    def slots(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Flat slot index [end - start] of positions start..end-1 of a sequence."""
        table = self._tables[seq_id]
        if end > len(table) * self.block_size:
            raise IndexError(f"sequence {seq_id} holds {len(table) * self.block_size} slots, asked for {end}")
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.int64)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's physical block ids in position order (a copy; a block may be shared, read only)."""
        return list(self._tables[seq_id])

    def usage(self) -> KVCacheUsage:
        return KVCacheUsage(
            used_blocks=self.num_blocks - self._pool.num_available,
            total_blocks=self.num_blocks,
            block_size=self.block_size,
            num_sequences=len(self._tables),
            cached_blocks=self._pool.num_cached,
            prefix_query_tokens=self._query_tokens,
            prefix_hit_tokens=self._hit_tokens,
        )
