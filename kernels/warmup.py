"""warmup: compile and autotune the Triton kernels at load, before the first request pays for it.

On a GPU the first call of an autotuned kernel for a new key (``tuning.py``) compiles and times every
configuration left after pruning: seconds per key. A server would otherwise spend them inside its first
requests. At load, the engine (attention, and the experts it holds itself) and each expert actor (its
experts) call these, once per distinct shape, with inputs that reach every key serving can reach:

    expert_ffn        one call per row block (``gemm_block_m``: 16, 32, 64 rows per expert)
    paged_attention   one call per query tile (``query_tiles``: queries per program, up to the longest chunk)

Dtypes, the dot precision and the kernels' own integer tensors are those of serving, since the same entry
points build them. Triton keeps compiled kernels in its on-disk cache, and the autotuner's choices beside them
(``tuning.KEEP_TIMINGS``), so a restart (an expert actor that Ray brings back) compiles and times nothing.
"""

from __future__ import annotations

import logging
import time

import torch
import triton

from moeshard.kernels.backend import resolve_backend
from moeshard.kernels.expert_ffn import expert_ffn
from moeshard.kernels.paged_attention import paged_attention, query_tiles
from moeshard.kernels.paged_layout import PagedLayout
from moeshard.kernels.tuning import gemm_block_m

logger = logging.getLogger(__name__)

ROWS_PER_EXPERT = (1, 16, 32, 64, 128)  # enough to reach every row block gemm_block_m picks


def uses_triton(device: torch.device, backend: str = "auto") -> bool:
    """Whether kernels called with ``backend`` on ``device`` run Triton (what there is to warm up)."""
    return resolve_backend(backend, device) == "triton"


def warm_up_expert_ffn(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, backend: str = "auto") -> int:
    """Run the grouped SwiGLU over w1/w3 [E, I, D], w2 [E, D, I] once per row block serving can pick.
    Returns the number of calls made (none where the kernels run on torch)."""
    E, I, D = w1.shape
    if not uses_triton(w1.device, backend):
        return 0
    started, calls, seen = time.perf_counter(), 0, set()
    for per_expert in ROWS_PER_EXPERT:
        rows = per_expert * E
        block = gemm_block_m(rows, E)
        if block in seen:
            continue
        seen.add(block)
        host_offsets = [e * per_expert for e in range(E + 1)]  # [E + 1] the rows split evenly
        offsets = torch.tensor(host_offsets, device=w1.device)
        rows_in = torch.zeros(rows, D, dtype=w1.dtype, device=w1.device)
        expert_ffn(rows_in, offsets, w1, w3, w2, backend=backend, host_offsets=host_offsets)
        calls += 1
    logger.info("grouped SwiGLU [%d x %d] warmed up: %d row blocks in %.1f s", I, D, calls, time.perf_counter() - started)
    return calls


def warm_up_paged_attention(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    sliding_window: int | None,
    longest_chunk: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    backend: str = "auto",
) -> int:
    """Run paged attention once per query tile that chunks of up to ``longest_chunk`` queries can pick, on a
    scratch cache of this layout. Returns the number of calls made (none where the kernels run on torch)."""
    if not uses_triton(device, backend):
        return 0
    started, calls = time.perf_counter(), 0
    group = num_heads // num_kv_heads
    lengths, tiles_seen, length = [], set(), 1
    while True:
        tiles = query_tiles(length, group)
        if tiles not in tiles_seen:
            tiles_seen.add(tiles)
            lengths.append(length)
        if length >= longest_chunk:
            break
        length = min(2 * length, longest_chunk)
    for n in lengths:
        blocks = triton.cdiv(n, block_size)
        layout = PagedLayout(
            query_lens=(n,), start_pos=(0,), block_tables=(tuple(range(blocks)),), block_size=block_size,
            sliding_window=sliding_window, device=device,
        )  # fmt: skip
        keys = torch.zeros(blocks * block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        q = torch.zeros(n, num_heads, head_dim, dtype=dtype, device=device)
        paged_attention(q, keys, torch.zeros_like(keys), layout, backend=backend)
        calls += 1
    logger.info("paged attention warmed up: %d query tiles in %.1f s", calls, time.perf_counter() - started)
    return calls
