"""Benchmark of the kernels: ``python -m moeshard.kernels.benchmarks.kernels``.

1. The torch (CPU) path of permute and combine as bandwidth, next to a plain
   memcpy (``Tensor.copy_``) of the same bytes in the same run: the ratio is the
   number to read, absolute GB/s depend on the machine and its load.
2. The per-call time of each Triton kernel at a small size: on a GPU when there
   is one, else under Triton's CPU interpreter (re-executed with
   TRITON_INTERPRET=1 when it was not set), next to the torch path.
3. On a GPU only: Mixtral 8x7B's shapes, the grouped SwiGLU of one MoE layer at
   decode and prefill row counts and paged attention (decode of 32 sequences,
   a prefill chunk with history), Triton (autotuned: the configuration it
   chose is printed) against the torch path, in bfloat16 and float32.

Dimensions: T tokens, D hidden, I expert hidden, E experts, K chosen per token, N = T*K rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moeshard.kernels.backend import triton_interprets
from moeshard.kernels.combine import combine
from moeshard.kernels.expert_ffn import expert_ffn
from moeshard.kernels.permute import permute
from moeshard.kernels.route import route

logger = logging.getLogger(__name__)


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class BandwidthRow:
    op: str
    dtype: str
    T: int
    megabytes: float  # read + written
    op_us: float  # allocating its output
    op_out_us: float  # into a preallocated out=
    copy_us: float

    def gbs(self, us: float) -> float:
        return self.megabytes * 1e3 / us


def bandwidth_rows(tokens: list[int], D: int, E: int, K: int, repeats: int) -> list[BandwidthRow]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for T in tokens:
            torch.manual_seed(T)
            hidden = torch.randn(T, D).to(dtype)  # [T, D]
            routing = route(torch.randn(T, E), K, backend="torch")
            perm = permute(hidden, routing.expert_ids, E, backend="torch")
            expert_out = torch.randn(perm.num_rows, D).to(dtype)  # [N, D]
            elt = hidden.element_size()
            permuted, combined = torch.empty_like(perm.rows), torch.empty_like(hidden)
            cases = [
                ("permute", 2 * perm.num_rows * D * elt,
                 lambda out=None: permute(hidden, routing.expert_ids, E, backend="torch", out=out), permuted),
                ("combine", (perm.num_rows + T) * D * elt,
                 lambda out=None: combine(expert_out, routing.weights, perm, backend="torch", out=out), combined),
            ]  # fmt: skip
            for op, nbytes, fn, out in cases:
                src = torch.randn(nbytes // (2 * elt)).to(dtype)  # copy_ reads and writes it: the same bytes
                dst = torch.randn_like(src)
                times = [
                    median_seconds(call, warmup=3, repeats=repeats) * 1e6
                    for call in (fn, lambda: fn(out), lambda: dst.copy_(src))
                ]
                rows.append(BandwidthRow(op, str(dtype).removeprefix("torch."), T, nbytes / 1e6, *times))
    return rows


@dataclass
class KernelRow:
    kernel: str
    dtype: str
    triton_ms: float
    torch_ms: float


def kernel_rows(T: int, D: int, I: int, E: int, K: int, repeats: int) -> list[KernelRow]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(T, E, generator=g).to(device, dtype)
        hidden = torch.randn(T, D, generator=g).to(device, dtype)
        w1, w3 = (torch.randn(E, I, D, generator=g).div(D**0.5).to(device, dtype) for _ in range(2))
        w2 = torch.randn(E, D, I, generator=g).div(I**0.5).to(device, dtype)
        routing = route(logits, K, backend="torch")
        perm = permute(hidden, routing.expert_ids, E, backend="torch")
        cases = {
            "route": lambda b: route(logits, K, backend=b),
            "permute": lambda b: permute(hidden, routing.expert_ids, E, backend=b),
            "expert_ffn": lambda b: expert_ffn(
                perm.rows, perm.expert_offsets, w1, w3, w2, backend=b, host_offsets=perm.host_offsets
            ),
            "combine": lambda b: combine(perm.rows, routing.weights, perm, backend=b),
        }
        for name, fn in cases.items():
            triton_s = median_seconds(lambda: fn("triton"), warmup=1, repeats=repeats)
            torch_s = median_seconds(lambda: fn("torch"), warmup=1, repeats=repeats)
            rows.append(KernelRow(name, str(dtype).removeprefix("torch."), triton_s * 1e3, torch_s * 1e3))
    return rows


@dataclass
class ModelShapeRow:
    case: str
    dtype: str
    triton_ms: float
    torch_ms: float
    config: str  # the configuration the autotuner chose for the case's last kernel
    error: float  # max |Triton - torch| over max(max |torch|, 1): the chosen configuration's values


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max(max |want|, 1), in float32."""
    got, want = got.float(), want.float()
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)


def _chosen(kernel) -> str:
    config = kernel.best_config
    tiles = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles}, warps={config.num_warps}, stages={config.num_stages}"


def model_shape_rows(device: str, dims: dict, repeats: int) -> Iterator[ModelShapeRow]:
    """The grouped SwiGLU at dims' row counts and paged attention at its decode and chunk sizes, Triton against torch,
    a row at a time (each case tunes its kernels first: a run cut short still has the rows before)."""
    from importlib import import_module

    from moeshard.kernels.paged_attention import paged_attention
    from moeshard.kernels.paged_layout import PagedLayout

    ffn, attention = import_module("moeshard.kernels.expert_ffn"), import_module("moeshard.kernels.paged_attention")
    D, I, E, K = dims["D"], dims["I"], dims["E"], dims["K"]
    H, Hkv, Dh, block = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["block_size"]
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        g = torch.Generator().manual_seed(0)
        w1, w3 = (torch.randn(E, I, D, generator=g).div(D**0.5).to(device, dtype) for _ in range(2))
        w2 = torch.randn(E, D, I, generator=g).div(I**0.5).to(device, dtype)
        for T in dims["tokens"]:
            routing = route(torch.randn(T, E, generator=g).to(device), K, backend="torch")
            perm = permute(torch.randn(T, D, generator=g).to(device, dtype), routing.expert_ids, E, backend="torch")
            call = lambda b: expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend=b, host_offsets=perm.host_offsets)  # noqa: E731
            error = relative_error(call("triton"), call("torch"))  # the first call for these sizes tunes
            triton_s = median_seconds(lambda: call("triton"), warmup=2, repeats=repeats)
            torch_s = median_seconds(lambda: call("torch"), warmup=2, repeats=repeats)
            yield ModelShapeRow(f"expert_ffn T={T}", name, triton_s * 1e3, torch_s * 1e3, _chosen(ffn._down_kernel), error)
        for label, seqs in (
            (f"attention decode {dims['decode_seqs']} x {dims['history']} keys", [(dims["history"], 1)] * dims["decode_seqs"]),
            (f"attention chunk {dims['chunk']} after {dims['history']}", [(dims["history"], dims["chunk"])]),
        ):
            needs = [-(-(start + n) // block) for start, n in seqs]
            order = torch.randperm(sum(needs), generator=g).tolist()
            tables = [tuple(order[sum(needs[:i]) : sum(needs[: i + 1])]) for i in range(len(needs))]
            layout = PagedLayout(
                query_lens=tuple(n for _, n in seqs), start_pos=tuple(s for s, _ in seqs),
                block_tables=tuple(tables), block_size=block, device=torch.device(device),
            )  # fmt: skip
            keys, values = (torch.randn(sum(needs) * block, Hkv, Dh, generator=g).to(device, dtype) for _ in range(2))
            q = torch.randn(layout.num_tokens, H, Dh, generator=g).to(device, dtype)
            call = lambda b: paged_attention(q, keys, values, layout, backend=b)  # noqa: E731
            error = relative_error(call("triton"), call("torch"))
            triton_s = median_seconds(lambda: call("triton"), warmup=2, repeats=repeats)
            torch_s = median_seconds(lambda: call("torch"), warmup=2, repeats=repeats)
            chosen = _chosen(attention._paged_attention_kernel)
            yield ModelShapeRow(label, name, triton_s * 1e3, torch_s * 1e3, chosen, error)


MODEL_SHAPES_HEADER = (
    "| case | dtype | Triton ms | torch ms | torch / Triton | chosen configuration | max error vs torch |\n"
    "|---|---|---:|---:|---:|---|---:|"
)


def format_model_shape(r: ModelShapeRow) -> str:
    return (
        f"| {r.case} | {r.dtype} | {r.triton_ms:.3f} | {r.torch_ms:.3f} | {r.torch_ms / r.triton_ms:.2f} | {r.config} "
        f"| {r.error:.1e} |"
    )


MIXTRAL_SHAPES = dict(
    D=4096, I=14336, E=8, K=2, tokens=[1, 32, 512, 4096],
    heads=32, kv_heads=8, head_dim=128, block_size=16, decode_seqs=32, history=2048, chunk=2048,
)  # fmt: skip


def format_bandwidth(rows: list[BandwidthRow]) -> str:
    lines = [
        "| op | dtype | T | MB moved | op GB/s | op out= GB/s | memcpy GB/s | op out= / memcpy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.dtype} | {r.T} | {r.megabytes:.1f} | {r.gbs(r.op_us):.1f} | {r.gbs(r.op_out_us):.1f} "
            f"| {r.gbs(r.copy_us):.1f} | {r.copy_us / r.op_out_us:.2f} |"
        )
    return "\n".join(lines)


def format_kernels(rows: list[KernelRow], where: str) -> str:
    lines = [
        f"| kernel | dtype | Triton ({where}) ms/call | torch ms/call | Triton / torch |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.triton_ms / r.torch_ms  # ~100 under the interpreter, about 1 compiled
        ratio_cell = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2f}"
        lines.append(f"| {r.kernel} | {r.dtype} | {r.triton_ms:.2f} | {r.torch_ms:.3f} | {ratio_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not triton_interprets():
        # Triton needs its interpreter on CPU, and reads the switch when first imported: start again with it.
        os.execve(sys.executable, [sys.executable, "-m", "moeshard.kernels.benchmarks.kernels", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    E, K, D = 8, 2, 4096
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; E={E}, K={K}, D={D}; median of {args.repeats}")
    print()
    print("## torch path: permute and combine vs memcpy of the same bytes (CPU)")
    print()
    print(format_bandwidth(bandwidth_rows([64, 512, 4096], D, E, K, args.repeats)))
    print()
    small = dict(T=64, D=256, I=512, E=8, K=2)
    where = "GPU" if torch.cuda.is_available() else "interpreter"
    print(f"## Triton kernels, {where}, per call at T={small['T']}, D={small['D']}, I={small['I']}, E=8, K=2")
    print()
    print(format_kernels(kernel_rows(**small, repeats=3), where))
    if torch.cuda.is_available():
        print()
        print(f"## Mixtral 8x7B's shapes on {torch.cuda.get_device_name()}, median of {args.repeats}")
        print()
        print(MODEL_SHAPES_HEADER)
        for row in model_shape_rows("cuda", MIXTRAL_SHAPES, args.repeats):
            print(format_model_shape(row), flush=True)


if __name__ == "__main__":
    main()
