"""Benchmark of 8-bit expert weights on the CPU: ``python -m moeshard.kernels.benchmarks.int8_experts``.

A decode step of 16 or more sequences reads every expert's weights, and on a few cores that read is most of the
step (docs/performance.md). Half the bytes per weight would halve it if a product read int8 as fast as bfloat16.
This times an expert's SwiGLU (gate, up, down) four ways, over enough experts of the demo model's shape that none
stays in the cache, the ways taking turns sweep by sweep:

- ``bfloat16``: as served now, each weight prepacked for oneDNN where this machine packs bfloat16;
- ``int8 weight-only``: int8 weights with a bfloat16 scale per output channel (``aten._weight_int8pack_mm``),
  activations in bfloat16;
- ``int8 dynamic``: the same int8 weights prepacked for the ``x86`` quantized engine
  (``quantized.linear_dynamic``), which quantizes its float32 input to uint8 at each call;
- ``int8 per row``: moeshard's ``experts_int8`` (kernels/int8_linear.py), the same int8 weights prepacked for
  oneDNN's int8 linear, each row quantized with a scale of its own.

Beside the times: each way's error against float32 on the unquantized weights, and whether a row's output depends
on the rows beside it (one row alone against the same row next to one 20x larger): a serving system needs the
former small and the latter zero, or a token's output would change with the batch it lands in.

Prints figures only; read the ratios, these machines are shared.

Dimensions: n rows, D hidden, I the expert's hidden.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moeshard.kernels import linear as linear_module
from moeshard.kernels.benchmarks.linear import CACHE_BYTES, SHAPES, medians_taking_turns, seconds_per_call
from moeshard.kernels.expert_ffn import expert_rows_torch
from moeshard.kernels.int8_linear import Int8Weight, int8_expert_rows, onednn_int8_available, quantize_weight

_WEIGHT_ONLY = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
_QUANTIZED = "x86" in torch.backends.quantized.supported_engines


class Expert(NamedTuple):
    exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # float32 w1, w3 [I, D] and w2 [D, I]: the reference
    bf16: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # bfloat16, prepacked where this machine packs it
    int8: tuple[Int8Weight, Int8Weight, Int8Weight]  # the same, symmetric per output channel, plain int8


class Way(NamedTuple):
    name: str
    bytes_per_weight: int
    run: Callable[[torch.Tensor, Expert], torch.Tensor]  # x [n, D] float32 -> [n, D] float32


def make_expert(d: int, i: int) -> Expert:
    w1, w3 = torch.randn(i, d) * d**-0.5, torch.randn(i, d) * d**-0.5  # unit-scale outputs, as a trained model's
    w2 = torch.randn(d, i) * i**-0.5
    exact = (w1, w3, w2)
    bf16 = tuple(linear_module.prepack(w.to(torch.bfloat16)) for w in exact)
    return Expert(exact, bf16, tuple(quantize_weight(w, pack=False) for w in exact))


def swiglu(x: torch.Tensor, product: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """x [n, D] through an expert whose three products are ``product(x, 0|1|2)`` (w1, w3, w2) -> [n, D]."""
    return product(F.silu(product(x, 0)).mul_(product(x, 1)), 2)


def exact_rows(x: torch.Tensor, expert: Expert) -> torch.Tensor:
    return expert_rows_torch(x, *expert.exact)


def bf16_rows(x: torch.Tensor, expert: Expert) -> torch.Tensor:
    return expert_rows_torch(x.to(torch.bfloat16), *expert.bf16).float()


def weight_only_rows(x: torch.Tensor, expert: Expert, packed: list) -> torch.Tensor:
    """``packed`` holds the expert's int8 values and bfloat16 scales as the op takes them."""
    return swiglu(x.to(torch.bfloat16), lambda h, m: _WEIGHT_ONLY(h, *packed[m])).float()


def dynamic_rows(x: torch.Tensor, packed: list) -> torch.Tensor:
    """``packed`` holds the expert's three weights prepacked for ``quantized.linear_dynamic``."""
    return swiglu(x, lambda h, m: torch.ops.quantized.linear_dynamic(h, packed[m], True))


def available_ways(experts: list[Expert]) -> list[Way]:
    """The ways this build of torch has, each with its weights packed once, up front."""
    ways = [Way("bfloat16", 2, bf16_rows)]
    if _WEIGHT_ONLY is not None:
        weight_only = {id(e): [(q.values, q.scales.to(torch.bfloat16)) for q in e.int8] for e in experts}
        ways.append(Way("int8 weight-only", 1, lambda x, e: weight_only_rows(x, e, weight_only[id(e)])))
    if onednn_int8_available():
        per_row = {id(e): [quantize_weight(w) for w in e.exact] for e in experts}  # the same int8 values, packed
        ways.append(Way("int8 per row", 1, lambda x, e: int8_expert_rows(x, *per_row[id(e)]).float()))
    if _QUANTIZED:
        torch.backends.quantized.engine = "x86"
        dynamic = {id(e): [dynamic_pack(q) for q in e.int8] for e in experts}
        ways.append(Way("int8 dynamic", 1, lambda x, e: dynamic_rows(x, dynamic[id(e)])))
    return ways


def dynamic_pack(weight: Int8Weight):
    channels = weight.values.shape[0]
    zero_points = torch.zeros(channels, dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch; this is the one way to pack for the op
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch._make_per_channel_quantized_tensor(weight.values, weight.scales.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).abs().max() / reference.abs().max()).item()


def batch_dependence(way: Way, expert: Expert, d: int) -> float:
    """How far a row's output moves when a row 20x larger sits beside it, relative to the output."""
    x = torch.randn(4, d)
    x[3] *= 20
    alone, beside = way.run(x[:1], expert), way.run(x, expert)[:1]
    return relative_error(beside, alone)


def int8_table(rows: list[int], repeats: int) -> None:
    i, d = SHAPES["expert gate/up"]
    expert_bytes = 3 * i * d * 2  # in bfloat16
    experts = [make_expert(d, i) for _ in range(max(2, CACHE_BYTES // expert_bytes))]
    ways = available_ways(experts)
    print(f"{len(experts)} experts [{i}, {d}], bfloat16 prepacked: {experts[0].bf16[0].is_mkldnn}")
    print(f"ways: {', '.join(w.name for w in ways)}\n")
    names = [w.name for w in ways]
    print(f"| rows | {' | '.join(f'{n} (us)' for n in names)} | {' | '.join(f'{n} GB/s' for n in names)} | "
          f"{' | '.join(f'speed-up, {n}' for n in names[1:])} |")  # fmt: skip
    print(f"|---:|{'---:|' * (3 * len(ways) - 1)}")
    for n in rows:
        x = torch.randn(n, d)
        medians = medians_taking_turns(
            {w.name: lambda w=w: seconds_per_call(lambda e: w.run(x, e), experts, 1) for w in ways}, repeats
        )
        us = [f"{medians[name] * 1e6:.0f}" for name in names]
        rates = [f"{3 * i * d * w.bytes_per_weight / medians[w.name] / 1e9:.1f}" for w in ways]
        speed_ups = [f"{medians['bfloat16'] / medians[name]:.2f}x" for name in names[1:]]
        print(f"| {n} | {' | '.join(us)} | {' | '.join(rates)} | {' | '.join(speed_ups)} |")
    x = torch.randn(16, d)
    reference = exact_rows(x, experts[0])
    print("\n| way | max error / max output (16 rows) | a row's output moved by a 20x row beside it |")
    print("|---|---:|---:|")
    for way in ways:
        error = relative_error(way.run(x, experts[0]), reference)
        print(f"| {way.name} | {error:.2g} | {batch_dependence(way, experts[0], d):.2g} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (Ray's workers run with 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    int8_table([int(r) for r in args.rows.split(",")], args.repeats)


if __name__ == "__main__":
    main()
