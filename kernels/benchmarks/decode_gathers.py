"""A decode step's attention on the torch path: gathers into a new tensor a layer or kept buffers, or a mirror (not a test).

    python -m moeshard.kernels.benchmarks.decode_gathers [--threads 1] [--rounds 7] [--dtype float32|bfloat16]

The torch path's decode group (kernels/paged_plan.py) reads every sequence's visible keys and values in one
padded tensor per layer. Three ways to get it, each running the same decode steps (every sequence's blocks
consecutive, as the block pool hands them out, each layer with a cache of its own), taking turns step by step:

    new tensor    gathered from the paged cache into a new tensor each layer
    kept buffers  gathered into two buffers the step keeps for all its layers (``GatherBuffers``)
    mirror        read from a ``DecodeMirror`` that the previous step filled: the step copies in one key
                  and value per sequence (kernels/decode_mirror.py); here also below ``MIN_KEYS``, where
                  the model gathers by default: the figures are where that threshold comes from

The steps advance one position each, from the given number of keys less the rounds; the first is a warm-up
(where the mirror copies in every history). The table gives the median ms of a step's attention over its layers
and whether the three ways give the same outputs. In bfloat16 the kept buffers also hold the float32 copies the
masked call computes on, where the new tensors' way makes new ones each layer; the mirror holds float32.

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
from moeshard.kernels.decode_mirror import DecodeMirror
from moeshard.kernels.paged_attention import attention_dtype
from moeshard.kernels.paged_plan import GatherBuffers

BLOCK_SIZE = 16
# (B, S, H, Hkv, Dh, L): the synthetic Mixtral of the cluster benchmarks, the demo model's attention
CASES = (
    (32, 144, 8, 4, 64, 8), (16, 100, 9, 3, 64, 30), (64, 100, 9, 3, 64, 30),
    (32, 1024, 8, 4, 64, 8), (16, 2048, 9, 3, 64, 8), (64, 768, 9, 3, 64, 8),
)  # fmt: skip


def _fresh(self: GatherBuffers, name: str, cache: torch.Tensor, index: torch.Tensor, dtype: object = None) -> torch.Tensor:
    return cache.index_select(0, index)  # a new tensor each call (the masked call makes its own float32 copies)


def step_attention(q, caches, tables, keys_seen: int, mirror: DecodeMirror | None = None) -> list[torch.Tensor]:
    """One decode step's attention over every layer's cache, with one layout for the step as the model builds it."""
    b = q.shape[0]
    ids = tuple(range(b)) if mirror is not None else None
    layout = PagedLayout(
        query_lens=(1,) * b, start_pos=(keys_seen - 1,) * b, block_tables=tables, block_size=BLOCK_SIZE,
        decode_mirror=mirror, seq_ids=ids,
    )  # fmt: skip
    return [paged_attention(q, keys, values, layout, backend="torch", layer=i) for i, (keys, values) in enumerate(caches)]


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
    print("| sequences | keys each | heads / kv heads | layers | gather MB | new tensor (ms) | kept buffers (ms) "
          "| mirror (ms) | kept vs new | mirror vs kept | same output |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for b, s, h, hkv, dh, layers in CASES:
        blocks = -(-s // BLOCK_SIZE)
        tables = tuple(tuple(range(i * blocks, (i + 1) * blocks)) for i in range(b))
        slots = b * blocks * BLOCK_SIZE
        caches = [tuple(torch.randn(slots, hkv, dh, generator=g).to(dtype) for _ in "kv") for _ in range(layers)]
        q = torch.randn(b, h, dh, generator=g).to(dtype)
        mirror = DecodeMirror(layers, hkv, dh, attention_dtype(dtype, q.device), q.device, budget_bytes=2**40, min_keys=0)
        times: dict[str, list[float]] = {"new": [], "kept": [], "mirror": []}
        outs: dict[str, list[torch.Tensor]] = {}
        first = max(1, s - args.rounds)  # keys seen at the warm-up step
        for keys_seen in range(first, s + 1):
            for way in times:
                with mock.patch.object(GatherBuffers, "index_select", _fresh) if way == "new" else contextlib.nullcontext():
                    started = time.perf_counter()
                    outs[way] = step_attention(q, caches, tables, keys_seen, mirror if way == "mirror" else None)
                    if keys_seen > first:
                        times[way].append(time.perf_counter() - started)
        same = all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(outs["new"], outs["kept"], outs["mirror"]))
        new, kept, mirrored = (statistics.median(times[way]) * 1e3 for way in times)
        megabytes = b * s * hkv * dh * dtype.itemsize / 2**20  # one of the two gathers
        cells = (b, s, f"{h} / {hkv}", layers, f"{megabytes:.1f}", f"{new:.1f}", f"{kept:.1f}", f"{mirrored:.1f}",
                 f"{new / kept:.2f}x", f"{kept / mirrored:.2f}x", same)  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
