"""A decode step's attention on the torch path, its gathers into kept buffers or into a new tensor a layer (not a test).

    python -m moeshard.kernels.benchmarks.decode_gathers [--threads 1] [--rounds 7] [--dtype float32|bfloat16]

The torch path's decode group (kernels/paged_plan.py) gathers every sequence's visible keys and values from the
paged cache into one padded tensor per layer. ``GatherBuffers`` keeps the step's two buffers for all its layers;
the other way allocates them afresh each layer, as before it. Both run the same steps (every sequence's blocks
consecutive, as the block pool hands them out, each layer with a cache of its own) taking turns round by round;
the table gives the median ms of a step's attention over its layers and checks that both give the same output.
In bfloat16 the kept buffers also hold the float32 copies the masked call computes on, where the other way
makes new ones each layer.

Dimensions: B sequences decoding, S keys each sees, H heads, Hkv kv heads, Dh head dim, L layers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from moeshard.kernels import PagedLayout, paged_attention
from moeshard.kernels.paged_plan import GatherBuffers

BLOCK_SIZE = 16
# (B, S, H, Hkv, Dh, L): the synthetic Mixtral of the cluster benchmarks, the demo model's attention
CASES = (
    (32, 144, 8, 4, 64, 8), (16, 100, 9, 3, 64, 30), (64, 100, 9, 3, 64, 30),
    (32, 1024, 8, 4, 64, 8), (16, 2048, 9, 3, 64, 8), (64, 768, 9, 3, 64, 8),
)  # fmt: skip


def _fresh(self: GatherBuffers, name: str, cache: torch.Tensor, index: torch.Tensor, dtype: object = None) -> torch.Tensor:
    return cache.index_select(0, index)  # a new tensor each call (the masked call makes its own float32 copies)


def step_attention(q, caches, tables, keys_seen: int) -> list[torch.Tensor]:
    """One decode step's attention over every layer's cache, with one layout for the step as the model builds it."""
    b = q.shape[0]
    layout = PagedLayout(query_lens=(1,) * b, start_pos=(keys_seen - 1,) * b, block_tables=tables, block_size=BLOCK_SIZE)
    return [paged_attention(q, keys, values, layout, backend="torch") for keys, values in caches]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.kernels.benchmarks.decode_gathers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (Ray's workers run with 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the cache and queries")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, blocks of {BLOCK_SIZE}\n")
    print("| sequences | keys each | heads / kv heads | layers | gather MB | a new tensor a layer (ms) | kept buffers (ms) "
          "| speed-up | same output |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for b, s, h, hkv, dh, layers in CASES:
        blocks = -(-s // BLOCK_SIZE)
        tables = tuple(tuple(range(i * blocks, (i + 1) * blocks)) for i in range(b))
        slots = b * blocks * BLOCK_SIZE
        caches = [tuple(torch.randn(slots, hkv, dh, generator=g).to(dtype) for _ in "kv") for _ in range(layers)]
        q = torch.randn(b, h, dh, generator=g).to(dtype)
        with mock.patch.object(GatherBuffers, "index_select", _fresh):
            fresh_out = step_attention(q, caches, tables, s)
        kept_out = step_attention(q, caches, tables, s)
        same = all(torch.equal(x, y) for x, y in zip(fresh_out, kept_out))
        times: dict[str, list[float]] = {"fresh": [], "kept": []}
        for _ in range(args.rounds):
            for way in times:
                with mock.patch.object(GatherBuffers, "index_select", _fresh) if way == "fresh" else contextlib.nullcontext():
                    started = time.perf_counter()
                    step_attention(q, caches, tables, s)
                    times[way].append(time.perf_counter() - started)
        fresh, kept = (statistics.median(times[way]) * 1e3 for way in ("fresh", "kept"))
        megabytes = b * s * hkv * dh * dtype.itemsize / 2**20  # one of the two gathers
        cells = (b, s, f"{h} / {hkv}", layers, f"{megabytes:.1f}", f"{fresh:.1f}", f"{kept:.1f}", f"{fresh / kept:.2f}x", same)
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
