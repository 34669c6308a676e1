"""Physical KV blocks: who holds them, and the prefix cache's index of full blocks by content.

A block is free, held (a reference count above zero), or cached: nobody holds
it but it still carries the K/V of a known run of tokens and can be taken back
by the next sequence whose tokens start the same way. A full block is keyed by
a hash of its tokens chained to the hash of every block before it, so a key
names a whole prefix, never a block's tokens alone.

New blocks come from the free list first; when it is empty the least recently
released cached block is evicted (its key forgotten) and reused.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Sequence

logger = logging.getLogger(__name__)

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """The key of a full block: sha256 over the previous block's key and this block's token ids."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, count: int, parent: BlockHash | None = None) -> list[BlockHash]:
    """Keys of the first ``count`` full blocks of ``token_ids``, chained from ``parent``."""
    keys: list[BlockHash] = []
    for b in range(count):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        keys.append(parent)
    return keys


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._cached: OrderedDict[int, None] = OrderedDict()  # released blocks with a key, least recently released first
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}

    @property
    def num_available(self) -> int:
        """Blocks a sequence can take now: free ones and cached ones (evicted on the way)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks with a key, held or not."""
        return len(self._by_hash)

    def take(self) -> int:
        """A block for one holder: a free one, else the least recently released cached one, evicted."""
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise RuntimeError("no KV block is free")
        self._refcount[block] = 1
        return block

    def lookup(self, key: BlockHash) -> int | None:
        return self._by_hash.get(key)

    def is_held(self, block: int) -> bool:
        return self._refcount[block] > 0

    def share(self, block: int) -> None:
        """One more holder of a cached block (taking it off the eviction list when nobody held it)."""
        if self._refcount[block] == 0:
            del self._cached[block]
        self._refcount[block] += 1

    def release(self, block: int) -> None:
        self._refcount[block] -= 1
        if self._refcount[block] > 0:
            return
        if block in self._hash_of:
            self._cached[block] = None  # most recently released: evicted last
        else:
            self._free.append(block)

    def register(self, block: int, key: BlockHash) -> None:
        """Key a held, fully written block; a key another block already has keeps that block."""
        if key in self._by_hash or block in self._hash_of:
            return
        self._by_hash[key] = block
        self._hash_of[block] = key
