"""kernels/linear.py: each CPU route computes the same projection as F.linear."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import moeshard.kernels.linear as linear_module
from moeshard.kernels.backend import ENV_VAR as BACKEND_ENV_VAR
from moeshard.kernels.linear import (
    _ONEDNN_LINEAR,
    EXACT_ROWS,
    PACK_MIN_WEIGHT,
    PACKED_DTYPES,
    PREPACK_ENV_VAR,
    ROW_STEPS_PER_OCTAVE,
    SMALL_ROWS,
    intra_op_threads,
    linear,
    linear_into,
    linear_on_threads,
    padded_rows,
    prepack,
    prepacks,
    route_for,
    unpack,
)

needs_onednn = pytest.mark.skipif(_ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
needs_packed_bfloat16 = pytest.mark.skipif(
    torch.bfloat16 not in PACKED_DTYPES, reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
)

SHAPES = [(1536, 576), (576, 1536), (1024, 256), (192, 576)]  # widening, narrowing, at the size bound, small


class Projection(NamedTuple):
    x: torch.Tensor  # [N, K]
    weight: torch.Tensor  # [O, K]
    bias: torch.Tensor | None  # [O]


def _projection(rows: int, out_features: int, in_features: int, with_bias: bool, seed: int) -> Projection:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    return Projection(x, weight, bias)


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, SMALL_ROWS, SMALL_ROWS + 1, 16, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(out_features, in_features, rows, with_bias):
    x, weight, bias = _projection(rows, out_features, in_features, with_bias, seed=rows * 7 + out_features)
    got = linear(x, weight, bias)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    # float32 sums of K products in another order: absolute error grows with K (values are about sqrt(K))
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=in_features * 2e-7)


def test_routes_by_rows_weight_size_and_dtype():
    wide, narrow, small = torch.empty(1536, 576), torch.empty(576, 1536), torch.empty(192, 576)
    larger = "onednn" if _ONEDNN_LINEAR is not None else "plain"
    assert route_for(torch.empty(1, 576), wide) == route_for(torch.empty(SMALL_ROWS, 576), wide) == "weight_first"
    assert route_for(torch.empty(1, 1536), narrow) == route_for(torch.empty(SMALL_ROWS, 1536), narrow) == larger
    assert route_for(torch.empty(SMALL_ROWS + 1, 576), wide) == route_for(torch.empty(2048, 576), wide) == larger
    assert route_for(torch.empty(2, 576), small) == route_for(torch.empty(64, 576), small) == "plain"
    assert route_for(torch.empty(2, 576, dtype=torch.bfloat16), wide.bfloat16()) == "plain"
    assert route_for(torch.empty(64, 576), torch.empty(576, 1536).T) == "plain"  # a transposed view of a weight


def test_onednn_route_takes_a_strided_input():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1152, generator=generator)[:, ::2]  # [32, 576], not contiguous
    weight = torch.randn(1536, 576, generator=generator)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_features,in_features", [(576, 1536), (1536, 576)])  # each route
@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS + 2, 64])
def test_linear_into_writes_a_view_of_a_larger_buffer(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    buffer = torch.full((rows + 2, out_features), float("nan"))
    returned = linear_into(x, weight, buffer[1 : rows + 1])
    torch.testing.assert_close(buffer[1 : rows + 1], F.linear(x, weight), rtol=1e-5, atol=in_features * 2e-7)
    assert returned.data_ptr() == buffer[1].data_ptr()
    assert buffer[0].isnan().all() and buffer[rows + 1].isnan().all()  # nothing written outside the view


@needs_onednn
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 16, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_packed_bfloat16)])
def test_prepacked_weight_matches_f_linear(out_features, in_features, rows, with_bias, dtype):
    projection = _projection(rows, out_features, in_features, with_bias, seed=rows * 5 + in_features)
    x, weight, bias = (None if t is None else t.to(dtype) for t in projection)
    packed = prepack(weight)
    assert packed.is_mkldnn and packed.dtype == dtype and packed.shape == weight.shape
    assert route_for(x, packed) == "onednn"
    assert torch.equal(unpack(packed), weight)  # the plain weight back, bit for bit
    # float32: other kernels, other summation orders; bfloat16: float32 sums, then rounded as F.linear rounds
    tolerance = dict(rtol=1e-5, atol=in_features * 2e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    got = linear(x, packed, bias)
    assert got.shape == (rows, out_features) and got.is_contiguous() and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x, weight, bias), **tolerance)
    buffer = torch.full((rows + 2, out_features), float("nan"), dtype=dtype)
    linear_into(x, packed, buffer[1 : rows + 1])
    torch.testing.assert_close(buffer[1 : rows + 1], F.linear(x, weight), **tolerance)
    assert buffer[0].isnan().all() and buffer[rows + 1].isnan().all()


@needs_onednn
def test_prepack_keeps_weights_it_cannot_or_need_not_pack():
    packed = prepack(torch.randn(576, 576))
    assert prepack(packed) is packed  # packed already
    for weight in (
        torch.randn(8, 576),  # a router: below PACK_MIN_WEIGHT
        torch.randn(576, 576, dtype=torch.float16),  # not a packed dtype
        torch.randn(576, 1152)[:, ::2],  # a strided view
        torch.randn(4, 576, 576),  # not a matrix
    ):
        assert prepack(weight) is weight
    assert 8 * 576 < PACK_MIN_WEIGHT <= 192 * 576


@needs_onednn
def test_prepacks_on_cpu_with_the_torch_backend_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native_bfloat16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert PACKED_DTYPES == ({torch.float32, torch.bfloat16} if native_bfloat16 else {torch.float32})
    assert prepacks(cpu, torch.float32) and prepacks(cpu, torch.bfloat16) == native_bfloat16
    assert not prepacks(cpu, torch.float16) and not prepacks(cuda, torch.float32) and not prepacks(cuda, torch.bfloat16)
    assert (prepack(torch.randn(576, 576, dtype=torch.bfloat16)).is_mkldnn) == native_bfloat16
    monkeypatch.setenv(PREPACK_ENV_VAR, "0")
    assert not prepacks(cpu, torch.float32)
    monkeypatch.delenv(PREPACK_ENV_VAR)
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")  # the Triton kernels index stacked weights: keep them plain
    assert not prepacks(cpu, torch.float32)


def test_padded_rows_are_few_and_close_above_the_exact_range():
    assert [padded_rows(rows) for rows in range(EXACT_ROWS + 1)] == list(range(EXACT_ROWS + 1))
    padded = [padded_rows(rows) for rows in range(1, 8193)]
    assert all(rows <= got <= rows * (1 + 1 / ROW_STEPS_PER_OCTAVE) for rows, got in enumerate(padded, start=1))
    assert padded == sorted(padded)  # more rows never pad to fewer
    assert all(padded_rows(got) == got for got in padded)  # a padded count is its own padding
    doublings = (8192 // EXACT_ROWS).bit_length() - 1  # 16 -> 8192
    assert len(set(padded)) == EXACT_ROWS + ROW_STEPS_PER_OCTAVE * doublings


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_packed_bfloat16)])
def test_padded_call_gives_the_rows_of_the_padded_batch(dtype):
    """A call on 100 rows is oneDNN's call on 104: its rows are those of any 104-row batch that starts with them."""
    generator = torch.Generator().manual_seed(11)
    weight = prepack(torch.randn(1536, 576, generator=generator).to(dtype))
    x = torch.randn(104, 576, generator=generator).to(dtype)
    assert padded_rows(100) == 104
    assert torch.equal(linear(x[:100], weight), linear(x, weight)[:100])
    three_dims = linear(x[:100].reshape(4, 25, 576), weight)  # leading dimensions kept
    assert three_dims.shape == (4, 25, 1536) and torch.equal(three_dims.reshape(100, 1536), linear(x, weight)[:100])


@needs_onednn
def test_onednn_builds_one_kernel_per_padded_row_count():
    """oneDNN's own log (ONEDNN_VERBOSE) of a run over 300 row counts: one kernel built per padded count."""
    script = textwrap.dedent(
        """
        import torch
        from moeshard.kernels.linear import linear, prepack
        torch.set_num_threads(1)
        weight = prepack(torch.randn(1536, 576))
        x = torch.randn(400, 576)
        for rows in range(100, 400):
            linear(x[:rows], weight)
        """
    )
    environment = {**os.environ, "ONEDNN_VERBOSE": "all"}
    log = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    built = [line for line in log.stdout.splitlines() if "create:cache_miss" in line and "matmul" in line]
    if not any("onednn_verbose" in line for line in log.stdout.splitlines()):
        pytest.skip("this oneDNN build logs nothing")
    assert 0 < len(built) <= len({padded_rows(rows) for rows in range(100, 400)}) < 300 / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_benchmark_stacks_the_same_swiglu(dtype, monkeypatch, capsys):
    """The stacked gate/up the benchmark times is the expert's SwiGLU, bit for bit, at every row count it reports."""
    from moeshard.kernels.benchmarks import linear as bench

    monkeypatch.setattr(bench, "SHAPES", {**bench.SHAPES, "expert gate/up": (512, 128)})  # large enough to pack
    monkeypatch.setattr(bench, "CACHE_BYTES", 4 * 3 * 512 * 128 * dtype.itemsize)  # 4 experts
    bench.gate_up_table([1, 3, 70], repeats=1, dtype=dtype)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in lines] == ["1", "3", "70"]
    assert all(line.split("|")[-2].strip() == "True" for line in lines), lines


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_benchmark_batches_the_same_experts(dtype, monkeypatch, capsys):
    """The batched products the benchmark times are the layer's experts run one by one, to rounding."""
    from moeshard.kernels.benchmarks import linear as bench

    monkeypatch.setattr(bench, "SHAPES", {**bench.SHAPES, "expert gate/up": (512, 128)})  # large enough to pack
    monkeypatch.setattr(bench, "CACHE_BYTES", 2 * 4 * 3 * 512 * 128 * dtype.itemsize)  # 2 layers of 4 experts
    bench.grouped_table([1, 3, 70], repeats=1, dtype=dtype, experts_per_layer=4)
    out = capsys.readouterr().out
    assert "2 layers of 4 experts [512, 128]" in out
    lines = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in lines] == ["1", "3", "70"]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert all(float(line.split("|")[-2]) <= tolerance for line in lines), lines


@pytest.fixture
def one_torch_thread():
    """The calling thread on one torch thread (as a Ray worker of one CPU), its own count back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_intra_op_threads_raise_the_count_and_restore_it(one_torch_thread):
    with intra_op_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    with intra_op_threads(1):  # never fewer than the caller's
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), intra_op_threads(3):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


@needs_onednn
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 32, 64, 100])
def test_an_lm_head_on_more_threads_gives_the_same_values(rows, packed, one_torch_thread, monkeypatch):
    """oneDNN shares the outputs out over its threads, not the sums: the values do not depend on the count."""
    torch.manual_seed(rows)
    plain = torch.randn(4096, 256)  # [V, D], 1M elements: through oneDNN unless weight-first at few rows
    weight = prepack(plain) if packed else plain
    x = torch.randn(rows, 256)  # [R, D]
    expected = linear(x, weight)
    threads_seen = []

    def recording_linear(*args):
        threads_seen.append(torch.get_num_threads())
        return linear(*args)

    monkeypatch.setattr(linear_module, "linear", recording_linear)
    got = linear_on_threads(x, weight, 2)
    assert torch.equal(got, expected)
    assert threads_seen == [2 if route_for(x, weight) == "onednn" else 1]
    assert torch.get_num_threads() == 1
