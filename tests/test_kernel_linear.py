"""kernels/linear.py: the few-row CPU path computes the same projection as F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeshard.kernels.linear import SMALL_ROWS, _weight_first, linear, linear_into

SHAPES = [(1536, 576), (576, 1536), (1024, 256), (192, 576)]  # widening, narrowing, at the size bound, small


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, SMALL_ROWS, SMALL_ROWS + 1, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(out_features, in_features, rows, with_bias):
    generator = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    got = linear(x, weight, bias)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_weight_first_only_for_few_rows_of_a_large_float32_weight():
    wide, narrow, small = torch.empty(1536, 576), torch.empty(576, 1536), torch.empty(192, 576)
    assert _weight_first(torch.empty(1, 576), wide) and _weight_first(torch.empty(SMALL_ROWS, 576), wide)
    assert _weight_first(torch.empty(2, 1536), narrow) and not _weight_first(torch.empty(1, 1536), narrow)
    assert not _weight_first(torch.empty(SMALL_ROWS + 1, 576), wide)
    assert not _weight_first(torch.empty(2, 576), small)
    assert not _weight_first(torch.empty(2, 576, dtype=torch.bfloat16), wide.bfloat16())


@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS + 2])
def test_linear_into_writes_a_view_of_a_larger_buffer(rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1536, generator=generator)
    weight = torch.randn(576, 1536, generator=generator)
    buffer = torch.full((rows + 2, 576), float("nan"))
    returned = linear_into(x, weight, buffer[1 : rows + 1])
    torch.testing.assert_close(buffer[1 : rows + 1], F.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert returned.data_ptr() == buffer[1].data_ptr()
    assert buffer[0].isnan().all() and buffer[rows + 1].isnan().all()  # nothing written outside the view
