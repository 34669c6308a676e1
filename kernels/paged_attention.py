"""paged_attention: causal grouped-query attention of a step's queries over the paged KV cache.

    out[t, h] = softmax(q[t, h] . K[b]^T * scale over the keys row t sees) . V[b]      (row t of sequence b)

Query head h reads kv head h // (H / Hkv). The step's own keys and values are
already in the cache; ``layout`` (``paged_layout.py``) says which rows belong to
which sequence, their positions and the sequences' block tables. Decode tokens,
prefill chunks starting at position 0 and chunks with history before them mix
in one call.

Dimensions: T query rows, H heads, Hkv kv heads, Dh head dim, B sequences, P programs' query blocks.

The torch path runs ``scaled_dot_product_attention`` on 4-d inputs (CPU's fused
flash kernel; 3-d inputs take the slow math path): one padded call for all the
decode tokens, and per prefill chunk, over a view of its keys where its blocks
are consecutive (``paged_plan.py``), one causal call, or two merged by their
log-sum-exps when the chunk has history before it, or one masked call when a
sliding window cuts in. The Triton kernel is one flash-style
program per (block of queries of one sequence, kv head): its tile's rows are the
block's queries times the H / Hkv query heads that read that kv head, so each
key and value block is loaded once for all of them (a decode token's heads fill
the tile rows one query alone would leave empty). It walks the sequence's keys
from the first any of its queries sees (sliding window) to the last (causal),
BLOCK_N positions at a time through the block table, with an online softmax in
float32. Its program table (``PagedLayout.query_blocks``) is built on the host
once per step and shared by every layer.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, triton_interprets
from moeshard.kernels.batch_invariance import batch_invariant_now, padded_keys
from moeshard.kernels.paged_layout import PagedLayout
from moeshard.kernels.paged_plan import ChunkPlan, TorchPlan
from moeshard.kernels.tuning import (
    ATTENTION_CONFIGS,
    AUTOTUNED_LAUNCH,
    KEEP_TIMINGS,
    autotune_bench,
    dot_precision,
    prune_attention,
)

logger = logging.getLogger(__name__)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    layout: PagedLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """q [T, H, Dh], key_cache and value_cache [slots, Hkv, Dh] holding every key the step reads -> [T, H, Dh].
    ``layer``: the caches' layer, which the layout's decode mirror (if any) keeps a copy of (decode_mirror.py)."""
    assert q.dim() == 3 and key_cache.dim() == 3 and key_cache.shape == value_cache.shape, (q.shape, key_cache.shape)
    T, H, Dh = q.shape
    Hkv = key_cache.shape[1]
    assert key_cache.shape[2] == Dh and H % Hkv == 0, (q.shape, key_cache.shape)
    assert T == layout.num_tokens, (T, layout.num_tokens)
    assert q.dtype == key_cache.dtype == value_cache.dtype, (q.dtype, key_cache.dtype, value_cache.dtype)
    scale = Dh**-0.5 if scale is None else scale
    if out is None:
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
    assert out.shape == (T, H, Dh) and out.dtype == q.dtype, (out.shape, out.dtype)
    if T == 0:
        return out
    if resolve_backend(backend, q.device) == "triton":
        paged_attention_triton(q, key_cache, value_cache, layout, scale, out)
    else:
        paged_attention_torch(q, key_cache, value_cache, layout, scale, out, layer)
    return out


# CPU's fused flash attention that also returns each query's log-sum-exp (a private op: None if absent).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def paged_attention_torch(q, key_cache, value_cache, layout: PagedLayout, scale: float, out, layer: int | None = None) -> None:
    plan = layout.torch_plan
    gqa = q.shape[1] != key_cache.shape[1]
    if batch_invariant_now():
        assert plan.decode is None or plan.decode.mirror is None, "batch-invariant attention reads no decode mirror"
        _attention_query_by_query(q, key_cache, value_cache, plan, scale, gqa, out)
        return
    for chunk in plan.chunks:
        queries = q[chunk.rows].transpose(0, 1)[None]  # [1, H, n, Dh]
        keys = _cache_rows(key_cache, chunk.keys).transpose(0, 1)[None]  # [1, Hkv, S, Dh]
        values = _cache_rows(value_cache, chunk.keys).transpose(0, 1)[None]  # [1, Hkv, S, Dh]
        out[chunk.rows] = _chunk_attention(queries, keys, values, chunk, scale, gqa)[0].transpose(0, 1)
    if plan.decode is not None:
        group = plan.decode
        if group.mirror is not None:  # the step's new keys copied in, the rest kept from earlier steps (decode_mirror.py)
            assert layer is not None, "a layout with a decode mirror needs the layer"
            keys, values = group.mirror.fill(layer, key_cache, value_cache)  # [Bd, Hkv, Smax, Dh] each, views
        else:
            Bd, Smax = group.slots.shape
            flat = group.slots.reshape(-1)  # [Bd * Smax]
            gathered, compute = group.gathered, _compute_dtype(q)  # into the step's buffers, not new tensors (paged_plan.py)
            keys, values = (
                gathered.index_select(name, cache, flat, compute).unflatten(0, (Bd, Smax)).transpose(1, 2)  # [Bd, Hkv, Smax, Dh] each
                for name, cache in (("keys", key_cache), ("values", value_cache))
            )  # in the dtype the masked call computes in (as the mirror's): its .to() of them is then a no-op
        queries = q.index_select(0, group.rows)[:, :, None, :]  # [Bd, H, 1, Dh]
        attended = _masked_attention(queries, keys, values, group.visible, scale, gqa)  # [Bd, H, 1, Dh]
        out.index_copy_(0, group.rows, attended[:, :, 0])


QUERIES_PER_CALL = 32  # a prefill chunk's queries go to SDPA this many at a time in batch-invariant mode


def _attention_query_by_query(q, key_cache, value_cache, plan: TorchPlan, scale: float, gqa: bool, out) -> None:
    """Batch-invariant attention (kernels/batch_invariance.py): every query, decode or prefill, as a query of its
    own over its sequence's keys from position 0, padded with masked zero keys to a multiple of KEY_MULTIPLE.
    The padded length does not change a query's result, so neither do the other sequences of the step, the
    chunk it is in, or whether its history came from the prefix cache. No sliding window (the engine refuses)."""
    for chunk in plan.chunks:
        assert chunk.mask is None, "batch-invariant attention has no sliding window"
        rows = q[chunk.rows]  # [n, H, Dh]
        n, S = rows.shape[0], chunk.history + rows.shape[0]
        keys, values = (_padded_to(_cache_rows(cache, chunk.keys), 0, padded_keys(S)) for cache in (key_cache, value_cache))
        keys, values = (x.to(_compute_dtype(q)).transpose(0, 1)[None] for x in (keys, values))  # [1, Hkv, S', Dh]
        for start in range(0, n, QUERIES_PER_CALL):
            queries = rows[start : start + QUERIES_PER_CALL, :, None, :]  # [g, H, 1, Dh]
            g = queries.shape[0]
            seen = chunk.history + torch.arange(start + 1, start + g + 1, device=q.device)  # [g] keys each query sees
            width = padded_keys(chunk.history + start + g)  # no key past the group's last query, padded: causal half only
            visible = (torch.arange(width, device=q.device)[None, :] < seen[:, None])[:, None, None, :]  # [g, 1, 1, width]
            group_keys, group_values = (x[:, :, :width].expand(g, -1, -1, -1) for x in (keys, values))  # [g, Hkv, width, Dh]
            attended = attention_by_products(queries, group_keys, group_values, visible, scale)
            out[chunk.rows][start : start + g] = attended[:, :, 0]
    if plan.decode is not None:
        group = plan.decode
        Bd, Smax = group.slots.shape
        flat = group.slots.reshape(-1)  # [Bd * Smax]
        width = padded_keys(Smax)
        keys, values = (_padded_to(_cache_rows(cache, flat).unflatten(0, (Bd, Smax)), 1, width) for cache in (key_cache, value_cache))  # [Bd, S', Hkv, Dh]
        visible = _padded_to(group.visible, 3, width)  # [Bd, 1, 1, S'], False past Smax
        queries = q.index_select(0, group.rows)[:, :, None, :]  # [Bd, H, 1, Dh]
        attended = attention_by_products(queries, keys.transpose(1, 2), values.transpose(1, 2), visible, scale)
        out.index_copy_(0, group.rows, attended[:, :, 0])


def attention_by_products(q, keys, values, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [g, H, n, Dh], keys and values [g, Hkv, S, Dh], mask [g, 1, n or 1, S] (True: visible) -> [g, H, n, Dh]:
    attention as two batched products and a softmax, for batch-invariant mode. Each of the g queries' products
    is a matrix product of its own, so its result does not depend on g; CPU SDPA's, on two threads, does (on an
    AVX2 machine a query's output changed with the number of queries beside it). Computed in q's dtype, or in
    float32 on the CPU for bfloat16 and float16 (as ``_masked_attention``); a query head h reads key head
    h // (H / Hkv), as SDPA's ``enable_gqa`` does."""
    compute = _compute_dtype(q)
    g, H, n, Dh = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    rep = H // Hkv
    assert mask.shape[1] == 1 and H % Hkv == 0, (mask.shape, H, Hkv)
    # bmm over explicit [g * Hkv] batches: matmul folds a broadcast (expanded) operand's batch into the rows of one
    # product, whose kernel then depends on g
    grouped = q.to(compute).reshape(g * Hkv, rep * n, Dh)  # the query heads sharing a key head, as rows
    keys, values = (x.to(compute).reshape(g * Hkv, S, Dh) for x in (keys, values))  # [g*Hkv, S, Dh]
    scores = torch.bmm(grouped, keys.transpose(1, 2)).mul_(scale)  # [g*Hkv, rep*n, S]
    scores = scores.view(g, Hkv, rep, n, S).masked_fill_(~mask[:, :, None], float("-inf"))  # [g, Hkv, rep, n, S]
    weights = scores.softmax(-1).view(g * Hkv, rep * n, S)
    return torch.bmm(weights, values).view(g, H, n, Dh).to(q.dtype)  # [g, H, n, Dh]


def _padded_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """x padded along ``dim`` to ``length`` with zeros (False)."""
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the torch path's masked calls compute in for queries of ``dtype`` on ``device`` (a decode mirror's)."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype ``_masked_attention`` computes in for q."""
    return attention_dtype(q.dtype, q.device)


def _cache_rows(cache: torch.Tensor, keys: slice | torch.Tensor) -> torch.Tensor:
    """cache [slots, Hkv, Dh] at ``keys`` (a slice: a view; an index [S]: ``index_select``, several times
    faster on CPU than advanced indexing) -> [S, Hkv, Dh]."""
    return cache[keys] if isinstance(keys, slice) else cache.index_select(0, keys)


def _masked_attention(q, keys, values, mask: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """SDPA with a boolean mask, in q's dtype. On the CPU in bfloat16 or float16 it computes on float32 copies of
    its inputs and rounds the output once: there a masked call measured 1.2-4.9x slower than the same call in
    float32 at the demo model's decode shapes (1-64 sequences, 20-100 keys); the copies are small."""
    compute = _compute_dtype(q)  # .to() is a no-op for q's own dtype
    attended = F.scaled_dot_product_attention(
        q.to(compute), keys.to(compute), values.to(compute), attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return attended.to(q.dtype)


def _chunk_attention(q, keys, values, chunk: ChunkPlan, scale: float, gqa: bool) -> torch.Tensor:
    """q [1, H, n, Dh], keys and values [1, Hkv, S, Dh] -> [1, H, n, Dh].

    A chunk with history and no mask: the history (seen by all) and the chunk's own keys (causal) in
    two flash calls, merged by their log-sum-exps; this skips the masked half that one masked call computes.
    """
    h = chunk.history
    if chunk.mask is not None:
        return _masked_attention(q, keys, values, chunk.mask, scale, gqa)
    if h == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    if _FLASH_WITH_LSE is None or q.device.type != "cpu":
        n, device = q.shape[2], q.device
        mask = torch.arange(keys.shape[2], device=device)[None, :] <= torch.arange(h, h + n, device=device)[:, None]  # [n, S]
        return _masked_attention(q, keys, values, mask, scale, gqa)
    before, before_lse = _FLASH_WITH_LSE(q, keys[:, :, :h], values[:, :, :h], 0.0, False, scale=scale)  # [1, H, n, Dh], [1, H, n]
    own, own_lse = _FLASH_WITH_LSE(q, keys[:, :, h:], values[:, :, h:], 0.0, True, scale=scale)
    return merge_attention(before, before_lse, own, own_lse).to(q.dtype)


def merge_attention(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets, from each one's output [..., n, Dh] and log-sum-exp [..., n]
    -> float32 [..., n, Dh], as if softmax had run over their union."""
    top = torch.maximum(a_lse, b_lse)
    weight_a = (a_lse - top).exp_()[..., None]  # [..., n, 1]
    weight_b = (b_lse - top).exp_()[..., None]
    return (a.float() * weight_a + b.float() * weight_b).div_(weight_a + weight_b)


class QueryTiles(NamedTuple):
    queries: int  # queries per program
    rows: int  # BLOCK_M: the tile's rows, one per (query, query head of the kv head), padded


def query_tiles(longest_chunk: int, group: int) -> QueryTiles:
    """A program's queries and tile rows: every query head that shares a kv head rides in one tile, so each
    key and value block is read once for the group. As many queries as the longest chunk needs (a power of
    two), up to 64 rows; at least one query, and 16 rows (tl.dot wants 16 at least)."""
    queries = max(1, min(triton.next_power_of_2(longest_chunk), 64 // group))
    return QueryTiles(queries, max(16, triton.next_power_of_2(queries * group)))


def paged_attention_triton(q, key_cache, value_cache, layout: PagedLayout, scale: float, out) -> None:
    H, Dh = q.shape[1:]
    Hkv = key_cache.shape[1]
    assert q.stride(2) == key_cache.stride(2) == value_cache.stride(2) == out.stride(2) == 1, "unit stride along Dh"
    tables = layout.device_tables
    tiles = query_tiles(max(layout.query_lens), H // Hkv)
    programs = layout.query_blocks(tiles.queries)
    window = layout.sliding_window
    with AUTOTUNED_LAUNCH:
        _paged_attention_kernel[(programs.shape[0], Hkv)](
            q, key_cache, value_cache, out,
            tables.block_tables, tables.query_starts, tables.query_lens, tables.start_pos,
            programs,
            q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1),
            value_cache.stride(0), value_cache.stride(1), out.stride(0), out.stride(1), tables.block_tables.stride(0),
            scale, window or 0, layout.block_size, Dh,
            GROUP=H // Hkv, QUERIES=tiles.queries, SLIDING=window is not None,
            BLOCK_M=tiles.rows, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
            DOT_FP32=triton_interprets(), PRECISION=dot_precision(q.dtype),
        )  # fmt: skip


@triton.autotune(
    configs=ATTENTION_CONFIGS,
    key=["block_size", "head_dim", "GROUP", "QUERIES", "SLIDING", "BLOCK_M", "BLOCK_D", "PRECISION"],
    prune_configs_by={"early_config_prune": prune_attention},
    cache_results=KEEP_TIMINGS,
    do_bench=autotune_bench,
)
@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tables_ptr, query_starts_ptr, query_lens_ptr, start_pos_ptr,
    programs_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_tb,
    scale, window, block_size, head_dim,
    GROUP: tl.constexpr, QUERIES: tl.constexpr, SLIDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out for QUERIES queries of one sequence and the GROUP query heads of one kv head, a tile row each.

    q_ptr, out_ptr      [T, H, Dh] (unit stride along Dh)
    k_ptr, v_ptr        [slots, Hkv, Dh] the layer's cache
    tables_ptr          [B, MB] int32 block tables
    query_starts_ptr    [B] int64 first row of each sequence in T; query_lens_ptr [B] int64; start_pos_ptr [B] int64
    programs_ptr        [P, 2] int64 (sequence, first query within it) of each program
    """
    b = tl.load(programs_ptr + 2 * tl.program_id(0))
    kvh = tl.program_id(1)
    first = tl.load(programs_ptr + 2 * tl.program_id(0) + 1)
    row0 = tl.load(query_starts_ptr + b)
    n = tl.load(query_lens_ptr + b)
    start = tl.load(start_pos_ptr + b)
    r = tl.arange(0, BLOCK_M)  # [BM] tile rows
    i = first + r // GROUP  # [BM] each row's query, counted within the sequence's
    h = kvh * GROUP + r % GROUP  # [BM] its query head
    i_ok = (r < QUERIES * GROUP) & (i < n)
    pos = start + i  # [BM] their positions
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_mask = i_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (row0 + i)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)  # [BM, BD]
    if DOT_FP32:
        q = q.to(tl.float32)
    end = start + tl.minimum(first + QUERIES, n)  # one past the last key any of these queries sees
    lo = start * 0
    if SLIDING:
        lo = tl.maximum(start + first - window + 1, 0)  # the first key any of them sees
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(lo, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        j_ok = j < end
        block = tl.load(tables_ptr + b * stride_tb + j // block_size, mask=j_ok, other=0).to(tl.int64)
        slot = block * block_size + j % block_size  # [BN]
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
        visible = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if SLIDING:
            visible = visible & (pos[:, None] - j[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at zero weight
        p = tl.exp(s - m_safe[:, None])  # [BM, BN]
        alpha = tl.exp(m_i - m_safe)  # [BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [BM, BD]
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + (row0 + i)[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
