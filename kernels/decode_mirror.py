"""The decode group's keys and values kept contiguous across steps, so a step copies in only what is new.

The torch path's decode group (``paged_plan.py``) runs one padded attention call over the keys and values of
every sequence decoding. Read from the paged cache, those are a gather of each sequence's whole history, every
layer of every step. A ``DecodeMirror`` keeps them instead in one padded tensor per layer that lives from step
to step, a row per sequence:

    keys[l]   [R, Hkv, C, Dh]   row r: the keys of positions 0 .. length - 1 of the sequence in row r
    values[l] [R, Hkv, C, Dh]   (R rows and C positions of capacity; in the dtype attention computes in)

A step plans once (``DecodeMirror.plan``) and every layer then copies in its fills (``MirrorStep.fill``): for a
sequence that was in the previous step's rows with the history this step extends, its one new key; for any
other (joined, or moved to fill the row of one that left), its whole history. Attention reads the rows as a
view ``[:n, :, :width]``: the same keys in the same order as the gather, so the same outputs up to rounding
(bit for bit in the benchmark's cases; at some head dims a row at another address rounds a last bit
differently). Each head's keys are contiguous, which SDPA on the CPU reads faster than the gather's layout.

Where the group is small (fewer than ``min_keys`` keys in its padded call, by default ``MIN_KEYS``) the step
gathers: its gather is cheap and read hot by the attention right after, while the mirror's rows come cold from
memory. On a 2-core AMD EPYC a step's attention with the mirror ran 0.93-0.98x the gathers at 16 sequences of
100 keys, 1.05-1.60x at 64 of 100, 1.91-2.41x at 32 of 1024 (kernels/benchmarks/decode_gathers.py,
docs/kernels.md); the crossover is the machine's (``EngineConfig.decode_mirror_min_keys``). A step that gathers
for its small group releases the mirror: its rows would fall behind, and the next mirrored step refills them.

A sequence keeps its row only while its history is unchanged: it must hold exactly the positions before this
step's query, the cache evicts it when it frees the sequence (finished, aborted, preempted), and a step whose
layers did not all fill (an error part way) drops every row. Sequences that leave free their rows; the rows
past the new count move into the holes (each move refills one history), so rows 0 .. n - 1 stay dense.

Memory: capacity grows by half again in each dimension the group passes (positions in steps of 64, rows of 8)
and everything is refilled from the cache when it does; a step whose capacity would pass ``budget_bytes`` (counted with what the other mirrors
of the cache hold) gathers as before and the mirror is released, as it is when its last sequence leaves. Under
continuous batching a group rarely empties, so a mirror that holds more than ``SHRINK_ABOVE`` times what its
group needs (the long sequence it grew for has left) is made anew at the group's size, refilled like a growth.
Models with a sliding window gather (their visible keys do not start at position 0).

Dimensions: L layers, R rows, C positions per row, n sequences in the step's group, F keys copied in a step,
Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from moeshard.kernels.host_copy import from_host

logger = logging.getLogger(__name__)

POSITION_STEP = 64  # capacity in positions grows in multiples of this
ROW_STEP = 8  # and in rows, of this
MIN_KEYS = 4096  # by default a group of fewer keys (sequences x the longest's keys) gathers
SHRINK_ABOVE = 4  # a mirror holding more than this many times what its group needs is made anew, fitted


class MirrorKV(NamedTuple):
    keys: torch.Tensor  # [n, Hkv, width, Dh], a view of the mirror
    values: torch.Tensor  # [n, Hkv, width, Dh]


class MirrorStep(NamedTuple):
    """One step's use of a mirror: the group's order in it and what each layer copies in."""

    mirror: "DecodeMirror"
    order: tuple[int, ...]  # [n] the member (index into the group's members) in each row
    lengths: torch.Tensor  # [n] int64 on the host: keys each row holds after the fill (its member's position + 1)
    fill_slots: torch.Tensor  # [F] int64 cache slots of the keys this step copies in
    fill_at: torch.Tensor  # [F * Hkv] int64 where each key's heads go in a layer's flattened [R * Hkv * C] rows
    width: int  # the longest row's keys

    def fill(self, layer: int, key_cache: torch.Tensor, value_cache: torch.Tensor) -> MirrorKV:
        """Copy this step's new keys and values of ``layer`` in from its cache [slots, Hkv, Dh]; the rows to attend."""
        return self.mirror.fill(self, layer, key_cache, value_cache)


class DecodeMirror:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        held_elsewhere: Callable[[], int] = lambda: 0,
        min_keys: int = MIN_KEYS,
    ):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.budget_bytes = budget_bytes  # for this mirror and those ``held_elsewhere`` counts together
        self._held_elsewhere = held_elsewhere
        self.min_keys = min_keys  # a smaller group gathers
        self.keys: torch.Tensor | None = None  # [L, R, Hkv, C, Dh]
        self.values: torch.Tensor | None = None  # [L, R, Hkv, C, Dh]
        self._row_seqs: list[int | None] = []  # the sequence in each row (None: a hole)
        self._lengths: dict[int, int] = {}  # sequence -> keys its row holds
        self._rows: dict[int, int] = {}  # sequence -> its row
        self._unfilled: set[int] = set()  # layers the last step has not filled yet

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the tensors hold; (0, 0) when released."""
        return (0, 0) if self.keys is None else (self.keys.shape[1], self.keys.shape[3])

    def evict(self, seq_id: int) -> None:
        """Forget a sequence (its cache blocks are being freed); the mirror is released with its last sequence."""
        if seq_id in self._rows:
            self._row_seqs[self._rows.pop(seq_id)] = None
            del self._lengths[seq_id]
        if not self._rows:
            self.release()

    def release(self) -> None:
        self.keys = self.values = None
        self._row_seqs, self._lengths, self._rows, self._unfilled = [], {}, {}, set()

    def plan(
        self, seq_ids: Sequence[int], positions: Sequence[int], slots_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> MirrorStep | None:
        """A step's group: member i is sequence ``seq_ids[i]`` with its one query at ``positions[i]``, its keys
        0 .. positions[i] in the cache at ``slots_at(members [N], positions [N])`` (host int64). None: this step
        gathers instead (a small group, or over budget), and the mirror is released."""
        if self._unfilled:  # the last step stopped part way: its rows may miss keys
            self.release()
        ends = [p + 1 for p in positions]  # keys each member sees
        rows, width = len(seq_ids), max(ends)
        if rows * width < self.min_keys:
            self.release()  # its rows would fall behind this step, and refill whole at the next mirrored one
            return None
        have_rows, have_positions = self.capacity
        # each dimension grows by half again where the group passes it, else stays
        want_rows = _grown(rows, have_rows, ROW_STEP) if rows > have_rows else have_rows
        want_positions = _grown(width, have_positions, POSITION_STEP) if width > have_positions else have_positions
        fitted = (_grown(rows, rows, ROW_STEP), _grown(width, width, POSITION_STEP))  # the group's size, room to grow
        if self._bytes_for(want_rows, want_positions) > SHRINK_ABOVE * self._bytes_for(*fitted):
            # the long sequences it grew for have left: hand the memory back
            logger.debug("decode mirror %d x %d made anew at %d x %d", have_rows, have_positions, *fitted)
            want_rows, want_positions = fitted
        if (want_rows, want_positions) != (have_rows, have_positions):
            if self._bytes_for(want_rows, want_positions) + self._held_elsewhere() > self.budget_bytes:
                logger.debug("a decode mirror of %d rows x %d positions is over its budget: gathering", want_rows, want_positions)
                self.release()
                return None
            self.release()  # everything is refilled from the cache, in the new capacity
            shape = (self.num_layers, want_rows, self.num_kv_heads, want_positions, self.head_dim)
            # zeros: a row's padding is read under the mask (weight 0, and 0 * NaN from stray memory would be NaN)
            self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        order, whole = self._assign_rows(seq_ids, positions)
        members = torch.tensor(order, dtype=torch.int64)  # [n] member of each row
        lengths = torch.tensor([ends[i] for i in order], dtype=torch.int64)  # [n]
        starts = torch.tensor([0 if whole[r] else ends[i] - 1 for r, i in enumerate(order)], dtype=torch.int64)  # [n]
        counts = lengths - starts  # [n] keys each row copies in
        row_of_fill = torch.repeat_interleave(torch.arange(rows), counts)  # [F]
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [F]
        fill_positions = starts[row_of_fill] + offsets  # [F]
        fill_slots = slots_at(members[row_of_fill], fill_positions)  # [F]
        heads = torch.arange(self.num_kv_heads)  # [Hkv]
        row_heads = row_of_fill[:, None] * self.num_kv_heads + heads[None, :]  # [F, Hkv]
        fill_at = (row_heads * self.capacity[1] + fill_positions[:, None]).reshape(-1)  # [F * Hkv]
        self._unfilled = set(range(self.num_layers))
        return MirrorStep(self, tuple(order), lengths, from_host(fill_slots, self.device), from_host(fill_at, self.device), width)

    def fill(self, step: MirrorStep, layer: int, key_cache: torch.Tensor, value_cache: torch.Tensor) -> MirrorKV:
        assert self.keys is not None and step.mirror is self, "a mirror step used after its mirror was released"
        n, width = len(step.order), step.width
        views = []
        for mirror, cache in ((self.keys[layer], key_cache), (self.values[layer], value_cache)):
            new = cache.index_select(0, step.fill_slots).to(self.dtype)  # [F, Hkv, Dh]
            mirror.view(-1, self.head_dim).index_copy_(0, step.fill_at, new.view(-1, self.head_dim))  # [F * Hkv] rows
            views.append(mirror[:n, :, :width])  # [n, Hkv, width, Dh]
        self._unfilled.discard(layer)
        return MirrorKV(*views)

    def _assign_rows(self, seq_ids: Sequence[int], positions: Sequence[int]) -> tuple[list[int], list[bool]]:
        """Rows 0 .. n - 1 for this step's members: a member whose row holds exactly the keys before its query
        keeps it; members past the kept count move into the holes below it; new members take the rows after.
        Returns each row's member and whether the row copies in a whole history (else its one new key)."""
        members = {seq: i for i, seq in enumerate(seq_ids)}
        assert len(members) == len(seq_ids), f"a sequence twice in one decode group: {seq_ids}"
        kept = sorted(
            (seq for seq in self._rows if seq in members and self._lengths[seq] == positions[members[seq]]),
            key=self._rows.__getitem__,
        )  # in row order
        n_kept = len(kept)
        stays = [seq for seq in kept if self._rows[seq] < n_kept]
        holes = sorted(set(range(n_kept)) - {self._rows[seq] for seq in stays})
        moves = [seq for seq in kept if self._rows[seq] >= n_kept]  # as many as there are holes
        new_rows = {seq: self._rows[seq] for seq in stays} | dict(zip(moves, holes))
        joins = [seq for seq in seq_ids if seq not in new_rows]
        new_rows |= {seq: n_kept + j for j, seq in enumerate(joins)}
        refill = set(moves) | set(joins)
        self._row_seqs = [None] * len(seq_ids)
        for seq, row in new_rows.items():
            self._row_seqs[row] = seq
        self._rows = new_rows
        self._lengths = {seq: positions[members[seq]] + 1 for seq in seq_ids}
        order = [members[seq] for seq in self._row_seqs]
        whole = [seq in refill for seq in self._row_seqs]
        return order, whole

    def _bytes_for(self, rows: int, positions: int) -> int:
        per_position = self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return 2 * self.num_layers * rows * positions * per_position


def _grown(need: int, have: int, step: int) -> int:
    """The capacity for ``need``: half again what there was, at least ``need``, in multiples of ``step``."""
    want = max(need, have + have // 2)
    return -(-want // step) * step
