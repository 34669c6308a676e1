"""paged_attention: Triton kernel (under the interpreter) vs the torch path vs a dense per-query loop.

Steps mix decode tokens, prefill chunks from position 0 and chunks with history; block tables are
shuffled, consecutive (the torch path's views) or share a prefix's blocks; GQA, sliding windows,
several block sizes, head dims and dtypes.

Dimensions: T query rows, H heads, Hkv kv heads, Dh head dim, B sequences.
"""

from __future__ import annotations

import math

import pytest
import torch

from moeshard.kernels import PagedLayout, paged_attention
from moeshard.kernels.paged_attention import merge_attention, query_tiles

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

DECODE = ((5, 1), (17, 1), (0, 1), (40, 1))
PREFILL = ((0, 7), (0, 33))
HISTORY = ((12, 9), (3, 20), (30, 2))
MIXED = ((9, 1), (0, 6), (20, 5), (33, 1), (7, 17), (2, 1))
LONG_CHUNK = ((0, 70), (64, 1))  # more queries than one program's block


def make_case(seqs, block_size, heads, kv_heads, head_dim, dtype, *, window=None, tables="shuffled", seed=0):
    """q [T, H, Dh], caches [slots, Hkv, Dh] and the layout of sequences (start_pos, num_queries).

    tables: "shuffled" (random blocks), "consecutive" (each table a run of ids), "shared" (every
    sequence's first blocks are the first sequence's: a shared prefix, read only).
    """
    g = torch.Generator().manual_seed(seed)
    needs = [math.ceil((s + n) / block_size) for s, n in seqs]
    num_blocks = sum(needs) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    built, used = [], 0
    for need in needs:
        if tables == "consecutive":
            built.append(tuple(range(used + 1, used + 1 + need)))
        else:
            built.append(tuple(order[used : used + need]))
        used += need
    if tables == "shared":
        prefix = built[0]
        built = [prefix[: min(len(prefix), need) - 1] + t[min(len(prefix), need) - 1 :] for t, need in zip(built, needs)]
    layout = PagedLayout(
        query_lens=tuple(n for _, n in seqs), start_pos=tuple(s for s, _ in seqs),
        block_tables=tuple(built), block_size=block_size, sliding_window=window,
    )  # fmt: skip
    slots = num_blocks * block_size
    keys = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    values = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(layout.num_tokens, heads, head_dim, generator=g).to(dtype)
    return q, keys, values, layout


def dense_attention(q, keys, values, layout: PagedLayout) -> torch.Tensor:
    """Query by query in float64: its sequence's keys first_visible(p) .. p by block table, softmax, weighted sum."""
    T, H, Dh = q.shape
    group = H // keys.shape[1]
    out = torch.zeros(T, H, Dh, dtype=torch.float64)
    row = 0
    for b, (start, n) in enumerate(zip(layout.start_pos, layout.query_lens)):
        table = layout.block_tables[b]
        for p in range(start, start + n):
            slots = [table[j // layout.block_size] * layout.block_size + j % layout.block_size
                     for j in range(layout.first_visible(p), p + 1)]  # fmt: skip
            for h in range(H):
                k = keys[slots, h // group].double()  # [S, Dh]
                v = values[slots, h // group].double()
                weights = torch.softmax(k @ q[row, h].double() / Dh**0.5, dim=0)  # [S]
                out[row, h] = weights @ v
            row += 1
    return out


def check(q, keys, values, layout) -> None:
    want = dense_attention(q, keys, values, layout)
    for backend in ("triton", "torch"):
        out = torch.full_like(q, float("nan"))
        got = paged_attention(q, keys, values, layout, backend=backend, out=out)
        assert got is out
        torch.testing.assert_close(got.double(), want, **TOL[q.dtype], msg=lambda m: f"{backend}: {m}")


CASES = [
    # name, seqs, block_size, H, Hkv, Dh, window, tables, dtype
    ("decode", DECODE, 4, 4, 2, 16, None, "shuffled", torch.float32),
    ("decode-one", ((13, 1),), 4, 4, 2, 16, None, "shuffled", torch.float32),
    ("prefill", PREFILL, 4, 4, 2, 16, None, "shuffled", torch.float32),
    ("prefill-consecutive", PREFILL, 16, 4, 4, 16, None, "consecutive", torch.float32),
    ("history", HISTORY, 4, 4, 2, 16, None, "shuffled", torch.float32),
    ("history-consecutive", HISTORY, 3, 4, 1, 8, None, "consecutive", torch.float32),
    ("mixed", MIXED, 4, 4, 2, 16, None, "shuffled", torch.float32),
    ("mixed-bs1", MIXED, 1, 4, 2, 8, None, "shuffled", torch.float32),
    ("mixed-bs5-dh24", MIXED, 5, 6, 2, 24, None, "consecutive", torch.float32),
    ("mixed-bs16-mha", MIXED, 16, 2, 2, 64, None, "shuffled", torch.float32),
    ("mixed-shared", MIXED, 4, 4, 2, 16, None, "shared", torch.float32),
    ("mixed-shared-window", MIXED, 2, 4, 2, 16, 4, "shared", torch.float32),
    ("decode-window", DECODE, 4, 4, 2, 16, 5, "shuffled", torch.float32),
    ("prefill-window", PREFILL, 4, 4, 1, 16, 5, "consecutive", torch.float32),
    ("history-window", HISTORY, 4, 4, 2, 16, 3, "shuffled", torch.float32),
    ("mixed-window-1", MIXED, 4, 4, 2, 16, 1, "shuffled", torch.float32),
    ("mixed-window-8", MIXED, 3, 4, 2, 8, 8, "consecutive", torch.float32),
    ("long-chunk", LONG_CHUNK, 8, 2, 1, 16, None, "shuffled", torch.float32),
    ("long-chunk-window", LONG_CHUNK, 8, 2, 1, 16, 20, "consecutive", torch.float32),
    # query heads per kv head: 3 and 8 split a long chunk into several programs, 16 and 32 fill a tile alone
    ("long-chunk-group3-window", LONG_CHUNK + MIXED, 4, 9, 3, 16, 12, "shuffled", torch.float32),
    ("long-chunk-group8", LONG_CHUNK + MIXED, 8, 16, 2, 16, None, "shuffled", torch.float32),
    ("decode-group16", DECODE, 4, 16, 1, 16, None, "shuffled", torch.float32),
    ("mixed-group32", MIXED + LONG_CHUNK, 4, 32, 1, 8, None, "consecutive", torch.float32),
    ("mixed-group8-bf16", MIXED, 4, 16, 2, 16, None, "shuffled", torch.bfloat16),
    ("mixed-bf16", MIXED, 4, 4, 2, 16, None, "shuffled", torch.bfloat16),
    ("mixed-window-bf16", MIXED, 4, 4, 2, 24, 6, "consecutive", torch.bfloat16),
]


@pytest.mark.parametrize(
    "name, seqs, block_size, heads, kv_heads, head_dim, window, tables, dtype", CASES, ids=[c[0] for c in CASES]
)
def test_paged_attention_matches_dense(name, seqs, block_size, heads, kv_heads, head_dim, window, tables, dtype):
    check(*make_case(seqs, block_size, heads, kv_heads, head_dim, dtype, window=window, tables=tables, seed=len(name)))


def test_the_shared_case_shares_blocks():
    *_, layout = make_case(MIXED, 4, 4, 2, 16, torch.float32, tables="shared")
    tables = [t for t in layout.block_tables if len(t) > 1]
    assert all(t[0] == layout.block_tables[0][0] for t in tables) and len(tables) >= 3


def test_keys_outside_the_visible_range_are_never_read():
    """Poison every slot a query may not see (later positions, other sequences, unused blocks, outside the window)."""
    q, keys, values, layout = make_case(MIXED, 4, 4, 2, 16, torch.float32, window=5)
    readable = torch.zeros(keys.shape[0], dtype=torch.bool)
    for b, (start, end) in enumerate(zip(layout.start_pos, layout.end_pos)):
        readable[layout.slots_of(b, layout.first_visible(start), end)] = True
    want = dense_attention(q, keys, values, layout)
    keys[~readable], values[~readable] = float("nan"), float("nan")
    for backend in ("triton", "torch"):
        got = paged_attention(q, keys, values, layout, backend=backend)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_a_custom_scale_is_applied():
    q, keys, values, layout = make_case(HISTORY, 4, 4, 2, 16, torch.float32)
    want = dense_attention(q * 0.5 * 16**0.5, keys, values, layout)  # dense uses 1/sqrt(Dh)
    for backend in ("triton", "torch"):
        got = paged_attention(q, keys, values, layout, scale=0.5, backend=backend)
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_query_blocks_cover_every_query_once():
    lens = (1, 16, 17, 40, 1)
    layout = PagedLayout(query_lens=lens, start_pos=(0,) * 5, block_tables=((0, 1, 2),) * 5, block_size=16)
    blocks = layout.query_blocks(16)
    assert blocks.dtype == torch.int64 and blocks.shape[1] == 2 and blocks.is_contiguous()
    covered = []
    for b, first in blocks.tolist():
        assert first < lens[b], "every program has queries"
        covered += [(b, i) for i in range(first, min(first + 16, lens[b]))]
    assert sorted(covered) == [(b, i) for b, n in enumerate(lens) for i in range(n)]
    assert layout.query_blocks(16) is blocks, "built once per step"


def test_layout_slots_and_views():
    layout = PagedLayout(query_lens=(3, 1), start_pos=(0, 5), block_tables=((4, 5), (2, 7)), block_size=4)
    assert layout.slot_mapping.tolist() == [16, 17, 18, 29]
    assert layout.contiguous_span(0, 2, 7) == slice(18, 23)
    assert layout.contiguous_span(1, 0, 6) is None
    assert layout.slots_of(1, 3, 6).tolist() == [11, 28, 29]
    with pytest.raises(AssertionError):
        PagedLayout(query_lens=(9,), start_pos=(0,), block_tables=((1, 2),), block_size=4)


def test_layers_sharing_a_layout_gather_into_one_buffer_and_each_get_their_own_keys():
    """A step's layers share its layout, and the torch path gathers every layer's decode keys into the same kept
    buffer: each layer's output is still its own cache's attention, and the buffer is reused, not reallocated."""
    q, keys, values, layout = make_case(DECODE + MIXED, 4, 4, 2, 16, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    caches = [(keys, values)] + [(torch.randn(keys.shape, generator=g), torch.randn(values.shape, generator=g)) for _ in range(2)]
    kept = []  # the decode group's keys buffer after each layer
    for layer_keys, layer_values in caches:
        got = paged_attention(q, layer_keys, layer_values, layout, backend="torch")
        torch.testing.assert_close(got.double(), dense_attention(q, layer_keys, layer_values, layout), **TOL[torch.float32])
        kept.append(layout.torch_plan.decode.gathered._kept["keys"])
    assert all(buffer is kept[0] for buffer in kept), "one buffer for every layer of the step"


def test_a_bfloat16_cache_is_gathered_into_kept_float32_copies():
    q, keys, values, layout = make_case(DECODE, 4, 4, 2, 16, torch.bfloat16, seed=13)
    check(q, keys, values, layout)  # against the dense reference, on both backends
    kept = layout.torch_plan.decode.gathered._kept
    assert kept["keys"].dtype == torch.bfloat16 and kept["keys as torch.float32"].dtype == torch.float32
    torch.testing.assert_close(kept["values as torch.float32"], kept["values"].float(), rtol=0, atol=0)


def test_history_without_the_flash_log_sum_exp_op(monkeypatch):
    """Where CPU's flash op with log-sum-exp is missing, a chunk with history takes one masked call."""
    import importlib

    module = importlib.import_module("moeshard.kernels.paged_attention")
    monkeypatch.setattr(module, "_FLASH_WITH_LSE", None)
    q, keys, values, layout = make_case(HISTORY, 4, 4, 2, 16, torch.float32, tables="consecutive")
    got = paged_attention(q, keys, values, layout, backend="torch")
    torch.testing.assert_close(got.double(), dense_attention(q, keys, values, layout), **TOL[torch.float32])


def test_merge_attention_equals_one_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))  # [H, n|S, Dh]
    scores = q @ k.transpose(1, 2)  # [H, n, S]
    whole = torch.softmax(scores, -1) @ v
    parts = [(torch.softmax(scores[..., s], -1) @ v[:, s], scores[..., s].logsumexp(-1)) for s in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(merge_attention(*parts[0], *parts[1]), whole)


@pytest.mark.parametrize("longest, group", [(1, 1), (1, 4), (1, 16), (7, 3), (70, 2), (70, 8), (200, 1), (1, 128)])
def test_a_tile_holds_whole_query_head_groups(longest, group):
    tiles = query_tiles(longest, group)
    assert tiles.queries >= 1 and tiles.rows >= max(16, tiles.queries * group)
    assert tiles.rows & (tiles.rows - 1) == 0, "tl.arange needs a power of two"
    assert tiles.queries * group <= 64 or tiles.queries == 1, "a tile stays within 64 rows unless one query's heads need more"
    assert tiles.queries <= max(1, longest) * 2, "no more queries per program than the longest chunk needs"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decode_gathers_benchmark_finds_the_same_outputs_every_way(monkeypatch, capsys, dtype):
    """Kept buffers (and, in bfloat16, their kept float32 copies) and a mirror against new tensors a layer: equal
    outputs."""
    from moeshard.kernels.benchmarks import decode_gathers

    monkeypatch.setattr(decode_gathers, "CASES", ((4, 64, 4, 2, 64, 3),))
    plan = decode_gathers.DecodeMirror.plan
    steps = []
    monkeypatch.setattr(decode_gathers.DecodeMirror, "plan", lambda self, *a: steps.append(plan(self, *a)) or steps[-1])
    decode_gathers.main(["--rounds", "2", "--dtype", dtype])
    assert len(steps) == 3 and all(s is not None for s in steps), "the mirror way reads a mirror, small as the case is"
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["4", "64", "4 / 2", "3"] and cells[-1] == "True", row
    assert all(float(cells[i]) > 0 for i in (5, 6, 7))
