"""The decode mirror (kernels/decode_mirror.py): the decode group's keys kept from step to step.

Steps of a changing group (sequences join, leave, are freed and come back shorter, grow past the capacity)
are attended through a mirror and, as the reference, by gathering from the paged cache; a steady step copies
in one key per sequence and no history; a step that stopped part way, a budget too small and a sliding window
fall back as the module says; the cache drops a freed sequence; a model decodes the same tokens either way.

Dimensions: L layers, H heads, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

import random

import pytest
import torch

from moeshard.cluster.model.kv_cache import KVCache
from moeshard.kernels import PagedLayout, paged_attention
from moeshard.kernels.decode_mirror import MIN_KEYS, POSITION_STEP, DecodeMirror

L, H, HKV, DH, BLOCK = 3, 4, 2, 16, 4
TABLE_BLOCKS = 64  # blocks each sequence may use (positions up to 255)


class Caches:
    """Every layer's paged cache and each sequence's block table (its own shuffled blocks)."""

    def __init__(self, num_seqs: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        slots = num_seqs * TABLE_BLOCKS * BLOCK
        self.keys = torch.randn(L, slots, HKV, DH, generator=g).to(dtype)  # [L, S, Hkv, Dh]
        self.values = torch.randn(L, slots, HKV, DH, generator=g).to(dtype)
        order = torch.randperm(num_seqs * TABLE_BLOCKS, generator=g).tolist()
        self.tables = {s: tuple(order[s * TABLE_BLOCKS : (s + 1) * TABLE_BLOCKS]) for s in range(num_seqs)}
        self.dtype = dtype


def decode_step(caches: Caches, seqs: dict[int, int], mirror: DecodeMirror | None, seed: int) -> list[torch.Tensor]:
    """Each layer's attention of one decode step of ``seqs`` (id -> position of its query)."""
    ids = tuple(seqs)
    layout = PagedLayout(
        query_lens=(1,) * len(ids), start_pos=tuple(seqs[s] for s in ids), block_tables=tuple(caches.tables[s] for s in ids),
        block_size=BLOCK, decode_mirror=mirror, seq_ids=ids if mirror is not None else None,
    )  # fmt: skip
    q = torch.randn(len(ids), H, DH, generator=torch.Generator().manual_seed(seed)).to(caches.dtype)
    return [
        paged_attention(q, caches.keys[layer], caches.values[layer], layout, backend="torch", layer=layer) for layer in range(L)
    ]


def mirror_for(caches: Caches, budget: int = 2**30, min_keys: int = 0) -> DecodeMirror:
    """A mirror of every group, small as the groups here are (by default the model gathers below MIN_KEYS)."""
    dtype = torch.float32  # the torch path computes in float32 on the CPU
    return DecodeMirror(L, HKV, DH, dtype, torch.device("cpu"), budget, min_keys=min_keys)


def assert_close_to_gathers(caches, seqs, mirror, seed) -> None:
    # the same keys in the same padded call; rows at other addresses may round a last bit differently
    tol = dict(rtol=1e-5, atol=1e-6) if caches.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in zip(decode_step(caches, seqs, mirror, seed), decode_step(caches, seqs, None, seed)):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_changing_group_attends_as_the_gathers_do(dtype):
    caches, rng = Caches(10, dtype), random.Random(0)
    mirror = mirror_for(caches)
    seqs = {s: rng.randint(0, 40) for s in range(10)}
    grown = False
    for step in range(60):
        active = {s: p for s, p in seqs.items() if rng.random() < 0.8}
        if len(active) < 2:
            continue
        before = mirror.capacity
        assert_close_to_gathers(caches, active, mirror, seed=step)
        grown |= mirror.capacity[1] > before[1] > 0
        for s in active:
            seqs[s] += 1
        if rng.random() < 0.15:  # freed and admitted again, shorter (a preemption's recompute)
            gone = rng.choice(list(seqs))
            mirror.evict(gone)
            seqs[gone] = rng.randint(0, 20)
    assert grown, "the run should have grown the mirror past its first capacity"


def test_a_steady_step_copies_in_one_key_per_sequence():
    caches = Caches(6)
    mirror = mirror_for(caches)
    seqs = {0: 30, 1: 7, 2: 19, 3: 0}
    first = mirror.plan(list(seqs), list(seqs.values()), lambda b, p: p)
    assert first.fill_slots.numel() == sum(p + 1 for p in seqs.values())  # joined: whole histories
    for layer in range(L):
        mirror.fill(first, layer, caches.keys[layer], caches.values[layer])
    steady = mirror.plan(list(seqs), [p + 1 for p in seqs.values()], lambda b, p: p)
    assert steady.fill_slots.numel() == len(seqs)  # one new key each, no history again
    assert steady.order == first.order
    for layer in range(L):
        mirror.fill(steady, layer, caches.keys[layer], caches.values[layer])
    # sequence 1 leaves: the last row moves into its hole and refills; the others copy one key
    del seqs[1]
    rows_before = dict(mirror._rows)
    after = mirror.plan(list(seqs), [p + 2 for p in seqs.values()], lambda b, p: p)
    moved = [s for s in seqs if mirror._rows[s] != rows_before[s]]
    assert moved == [3] and mirror._rows[3] == rows_before[1]
    assert after.fill_slots.numel() == (seqs[3] + 2 + 1) + 2  # sequence 3's whole history, one key for 0 and 2


def test_the_rows_equal_the_cache_after_every_step():
    caches, rng = Caches(5), random.Random(3)
    mirror = mirror_for(caches)
    seqs = {s: rng.randint(0, 60) for s in range(5)}
    for step in range(20):
        active = {s: p for s, p in seqs.items() if rng.random() < 0.7} or dict(list(seqs.items())[:2])
        if len(active) < 2:
            continue
        decode_step(caches, active, mirror, seed=step)
        for s, p in active.items():
            row = mirror._rows[s]
            slots = torch.tensor([caches.tables[s][i // BLOCK] * BLOCK + i % BLOCK for i in range(p + 1)])
            for layer in range(L):
                assert torch.equal(mirror.keys[layer, row, :, : p + 1], caches.keys[layer, slots].transpose(0, 1))
                assert torch.equal(mirror.values[layer, row, :, : p + 1], caches.values[layer, slots].transpose(0, 1))
        for s in active:
            seqs[s] += 1


def test_a_step_stopped_part_way_refills_every_row():
    caches = Caches(3)
    mirror = mirror_for(caches)
    seqs = {0: 5, 1: 9}
    step = mirror.plan(list(seqs), list(seqs.values()), lambda b, p: p)
    mirror.fill(step, 0, caches.keys[0], caches.values[0])  # layers 1 and 2 never ran
    again = mirror.plan(list(seqs), [p + 1 for p in seqs.values()], lambda b, p: p)
    assert again.fill_slots.numel() == sum(p + 2 for p in seqs.values())  # whole histories again


def test_over_its_budget_the_group_gathers_and_the_mirror_holds_nothing():
    caches = Caches(4)
    one_capacity = 2 * L * 8 * POSITION_STEP * HKV * DH * 4  # 8 rows x 64 positions, keys and values, float32
    mirror = mirror_for(caches, budget=one_capacity)
    seqs = {0: 10, 1: 20}
    decode_step(caches, seqs, mirror, seed=0)
    assert mirror.nbytes == one_capacity
    long = {0: 11, 1: POSITION_STEP + 5}  # needs 128 positions: over the budget
    tables = (caches.tables[0], caches.tables[1])
    layout = PagedLayout((1, 1), tuple(long.values()), tables, BLOCK, decode_mirror=mirror, seq_ids=(0, 1))
    assert layout.torch_plan.decode.mirror is None and layout.torch_plan.decode.slots is not None
    assert mirror.nbytes == 0
    assert_close_to_gathers(caches, long, mirror, seed=2)


def test_a_small_group_gathers_and_its_rows_refill_when_it_grows():
    caches = Caches(4)
    mirror = mirror_for(caches, min_keys=MIN_KEYS)
    assert mirror.plan([0, 1], [9, 9], lambda b, p: p) is None  # 2 x 10 keys
    width = MIN_KEYS // 2
    step = mirror.plan([0, 1], [width - 1, width - 1], lambda b, p: p)
    assert step is not None and step.fill_slots.numel() == 2 * width


def test_a_small_group_releases_the_mirror():
    caches = Caches(3)
    mirror = mirror_for(caches, min_keys=100)
    decode_step(caches, {0: 60, 1: 70}, mirror, seed=0)  # 2 x 71 keys: mirrored
    assert mirror.nbytes > 0
    decode_step(caches, {0: 30, 2: 20}, mirror, seed=1)  # 2 x 31 keys: gathers, and hands the mirror's memory back
    assert mirror.nbytes == 0
    assert_close_to_gathers(caches, {0: 62, 1: 71}, mirror, seed=2)  # mirrored again, every row refilled


def test_a_mirror_far_larger_than_its_group_is_made_anew_at_its_size():
    caches = Caches(20)
    mirror = mirror_for(caches)
    seqs = {s: 10 + s for s in range(19)} | {19: 200}  # one long sequence among short ones
    decode_step(caches, seqs, mirror, seed=0)
    assert mirror.capacity == (24, 256)
    for s in range(3, 20):  # the long one and most others finish; the group never empties
        mirror.evict(s)
        del seqs[s]
    seqs = {s: p + 1 for s, p in seqs.items()}
    assert mirror.plan(list(seqs), list(seqs.values()), lambda b, p: p) is not None
    assert mirror.capacity == (8, 64)  # the group's size, with room to grow (it held 12x that)
    mirror.release()
    assert_close_to_gathers(caches, seqs, mirror, seed=1)
    for s, p in seqs.items():  # after the shrink the rows still equal the cache
        slots = torch.tensor([caches.tables[s][i // BLOCK] * BLOCK + i % BLOCK for i in range(p + 1)])
        assert torch.equal(mirror.keys[1, mirror._rows[s], :, : p + 1], caches.keys[1, slots].transpose(0, 1))


def test_a_mirror_a_few_times_its_group_keeps_its_rows():
    caches = Caches(10)
    mirror = mirror_for(caches)
    seqs = {0: 200, 1: 100, 2: 90, 3: 80}
    decode_step(caches, seqs, mirror, seed=0)
    assert mirror.capacity == (8, 256)
    mirror.evict(0)
    rest = {s: p + 1 for s, p in seqs.items() if s != 0}  # 101 keys: fitted would be 8 x 192, under 4x
    step = mirror.plan(list(rest), list(rest.values()), lambda b, p: p)
    assert mirror.capacity == (8, 256)
    assert step.fill_slots.numel() == (len(rest) - 1) + (rest[3] + 1)  # one key each, the moved row its history
    for layer in range(L):
        mirror.fill(step, layer, caches.keys[layer], caches.values[layer])
    more = {s: p + 1 for s, p in rest.items()} | {s: 30 for s in range(4, 10)}  # 9 rows: only the rows grow
    assert mirror.plan(list(more), list(more.values()), lambda b, p: p) is not None
    assert mirror.capacity == (16, 256)


def test_a_sliding_window_gathers():
    caches = Caches(2)
    mirror = mirror_for(caches)
    layout = PagedLayout(
        (1, 1), (30, 12), (caches.tables[0], caches.tables[1]), BLOCK, sliding_window=8, decode_mirror=mirror, seq_ids=(0, 1)
    )
    assert layout.torch_plan.decode.mirror is None and mirror.nbytes == 0


def test_the_cache_drops_a_freed_sequence_and_releases_the_last():
    cache = KVCache(L, HKV, DH, num_blocks=32, block_size=BLOCK, dtype=torch.bfloat16, mirror_bytes=2**24, mirror_min_keys=0)
    mirror = cache.decode_mirrors[0]
    assert mirror.dtype == torch.float32 and len(cache.decode_mirrors) == 2
    for seq in (7, 8):
        cache.reserve(seq, 10)
    step = mirror.plan([7, 8], [4, 9], lambda b, p: p)
    assert step is not None
    for layer in range(L):
        mirror.fill(step, layer, cache.keys[layer], cache.values[layer])
    cache.free(7)
    assert set(mirror._rows) == {8} and mirror.nbytes > 0
    cache.free(8)
    assert mirror.nbytes == 0 and mirror.capacity == (0, 0)
    assert KVCache(L, HKV, DH, num_blocks=8, block_size=BLOCK, dtype=torch.float32, mirror_bytes=0).decode_mirrors == ()


def test_the_two_mirrors_of_a_cache_share_its_budget():
    per_position = 2 * L * HKV * DH * 4
    budget = per_position * 8 * 64 * 3 // 2
    cache = KVCache(L, HKV, DH, num_blocks=64, block_size=BLOCK, dtype=torch.float32, mirror_bytes=budget, mirror_min_keys=0)
    first, second = cache.decode_mirrors
    assert first.plan([0, 1], [3, 4], lambda b, p: p) is not None  # 8 x 64: two thirds of the budget
    assert second.plan([2, 3], [3, 4], lambda b, p: p) is None  # another 8 x 64 would pass it


def test_a_model_decodes_the_same_tokens_with_and_without_its_mirror(tiny_checkpoint_factory, monkeypatch):
    from moeshard.cluster import LLM, SamplingParams

    path = tiny_checkpoint_factory("mirror", seed=5)
    prompts = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1, 2]]
    steps = []
    plan = DecodeMirror.plan
    monkeypatch.setattr(DecodeMirror, "plan", lambda self, *a: steps.append(plan(self, *a)) or steps[-1])
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(path, decode_mirror_min_keys=0) as llm:  # every group mirrored, small as they are
        mirrored = [out.token_ids for out in llm.generate(prompts, params)]
        cache = llm.engine.model.cache
        assert all(m.nbytes == 0 for m in cache.decode_mirrors)  # released with the last sequence
    steady = [s for s in steps if s is not None and s.fill_slots.numel() == len(s.order)]
    assert len(steady) > 15, "most decode steps copy in one key per sequence"
    steps.clear()
    with LLM(path, decode_mirror_bytes=0) as llm:
        gathered = [out.token_ids for out in llm.generate(prompts, params)]
    assert steps == [] and mirrored == gathered


def test_the_decode_mirror_benchmark_finds_the_same_tokens_both_ways(capsys):
    from moeshard.cluster.loadtest import decode_mirror_bench

    args = ["--sequences", "3", "--prompt-len", "40", "--tokens", "4", "--repeats", "1", "--mirror-min-keys", "0"]
    decode_mirror_bench.main(args)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["3", "40"] and cells[-1] == "True", row
    assert float(cells[2]) > 0 and float(cells[3]) > 0
