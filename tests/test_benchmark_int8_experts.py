"""The 8-bit expert benchmark computes what it says: each way is the expert's SwiGLU on its int8 weights, and it
tells a batch-invariant way from one that is not."""

import pytest
import torch

from moeshard.kernels.benchmarks import int8_experts as bench
from moeshard.kernels.int8_linear import dequantize_weight

D, I = 128, 512  # large enough for oneDNN to pack bfloat16


def test_each_way_is_the_experts_swiglu_on_its_weights():
    torch.manual_seed(0)
    expert = bench.make_expert(D, I)
    ways = bench.available_ways([expert])
    x = torch.randn(5, D)
    on_int8 = bench.expert_rows_torch(x, *(dequantize_weight(q) for q in expert.int8))  # float32 on the int8 weights
    reference = bench.exact_rows(x, expert)
    assert bench.relative_error(dequantize_weight(expert.int8[0]), expert.exact[0]) < 0.01
    for way in ways:
        out = way.run(x, expert)
        assert out.shape == (5, D) and out.dtype == torch.float32
        target = reference if way.name == "bfloat16" else on_int8
        tolerance = {"bfloat16": 0.02, "int8 weight-only": 0.02, "int8 dynamic": 0.1, "int8 per row": 0.05}[way.name]
        assert bench.relative_error(out, target) < tolerance, way.name


def test_weight_only_int8_is_batch_invariant_and_dynamic_int8_is_not():
    """The finding docs/performance.md records: torch's dynamic int8 product quantizes its whole input with one
    scale, so a row's output moves with the rows beside it; the weight-only product does not."""
    torch.manual_seed(0)
    expert = bench.make_expert(D, I)
    by_name = {way.name: way for way in bench.available_ways([expert])}
    assert bench.batch_dependence(by_name["bfloat16"], expert, D) == 0
    for name in ("int8 weight-only", "int8 per row"):
        if name in by_name:
            assert bench.batch_dependence(by_name[name], expert, D) == 0, name
    if "int8 dynamic" not in by_name:
        pytest.skip("this torch has no x86 quantized engine")
    assert bench.batch_dependence(by_name["int8 dynamic"], expert, D) > 0.1


def test_table_reports_every_row_count(monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", {"expert gate/up": (I, D)})
    monkeypatch.setattr(bench, "CACHE_BYTES", 3 * 3 * I * D * 2)  # 3 experts
    bench.int8_table([1, 3, 70], repeats=1)
    out = capsys.readouterr().out
    assert f"3 experts [{I}, {D}]" in out
    lines = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split("|")[1].strip() for line in lines] == ["1", "3", "70"]
    assert all(float(cell) > 0 for line in lines for cell in line.split("|")[2:5] if cell.strip()), lines
