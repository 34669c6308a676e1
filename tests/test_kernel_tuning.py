"""tuning: the autotuned kernels' configurations, their pruning and the float32 dot precision.

Under the interpreter the autotuner must run the one interpreter configuration and time nothing; the
GPU pruning and precision rules are checked here with the interpreter switched off for the rule alone.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import triton

from moeshard.kernels import expert_ffn, paged_attention, permute
from moeshard.kernels.tuning import (
    ATTENTION_CONFIGS,
    GEMM_CONFIGS,
    dot_precision,
    gemm_block_m,
    gemm_pruner,
    interpreter_gemm_tiles,
    prune_attention,
)

tuning = importlib.import_module("moeshard.kernels.tuning")
expert_ffn_module = importlib.import_module("moeshard.kernels.expert_ffn")
attention_module = importlib.import_module("moeshard.kernels.paged_attention")


A100 = tuning.GpuPart(80, tuning.A100_SHARED_MEMORY - tuning.SCRATCH)
H100 = tuning.GpuPart(90, 227 * 1024 - tuning.SCRATCH)


@pytest.fixture(params=[A100, H100], ids=["sm80", "sm90"])
def on_a_gpu(monkeypatch, request) -> tuning.GpuPart:
    """The tuning rules as they apply to compiled kernels, on an A100 and on an H100."""
    monkeypatch.setattr(tuning, "triton_interprets", lambda: False)
    monkeypatch.setattr(tuning, "gpu_part", lambda device_index=0: request.param)
    return request.param


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_the_interpreter_runs_one_fixed_configuration_and_times_nothing():
    T, E, K, D, I = 9, 4, 2, 40, 100
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, D, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    perm = permute(hidden, ids, E, backend="torch")
    w1, w3 = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g)
    w2 = torch.randn(E, D, I, generator=g)
    got = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend="triton")
    want = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for kernel, (out_dim, reduce_dim) in ((expert_ffn_module._gate_up_kernel, (I, D)), (expert_ffn_module._down_kernel, (D, I))):
        assert kernel.best_config.kwargs == interpreter_gemm_tiles(out_dim, reduce_dim)
        assert _timed_nothing(kernel), "the interpreter timed configurations"


def test_the_attention_kernel_runs_the_interpreter_key_block():
    from moeshard.kernels import PagedLayout

    layout = PagedLayout(query_lens=(1, 5), start_pos=(3, 0), block_tables=((2,), (0, 1)), block_size=4)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(layout.num_tokens, 4, 16, generator=g)
    keys, values = torch.randn(12, 2, 16, generator=g), torch.randn(12, 2, 16, generator=g)
    got = paged_attention(q, keys, values, layout, backend="triton")
    torch.testing.assert_close(got, paged_attention(q, keys, values, layout, backend="torch"), rtol=1e-5, atol=1e-5)
    kernel = attention_module._paged_attention_kernel
    assert kernel.best_config.kwargs == {"BLOCK_N": tuning.INTERPRETER_ATTENTION_BLOCK_N}
    assert _timed_nothing(kernel)


def _timed_nothing(kernel) -> bool:
    """Whether the autotuner timed nothing: recent Triton keeps no timings for a lone configuration, older Triton
    keeps the zeros of ``autotune_bench``, which did not run the kernel."""
    timings = getattr(kernel, "configs_timings", None) or {}
    return all(list(t) == [0.0, 0.0, 0.0] for t in timings.values())


def test_autotune_bench_runs_nothing_under_the_interpreter():
    calls = []
    assert tuning.autotune_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("out_dim, reduce_dim, operands", [(14336, 4096, 2), (4096, 14336, 1), (96, 40, 2), (768, 2048, 2)])
def test_gpu_gemm_configurations_fit_the_dimensions_and_shared_memory(on_a_gpu, dtype, block_m, out_dim, reduce_dim, operands):
    rows = torch.empty(0, dtype=dtype)
    kept = gemm_pruner("out", "reduce", "rows", operands)(
        GEMM_CONFIGS, {"out": out_dim, "reduce": reduce_dim, "rows": rows}, BLOCK_M=block_m
    )
    assert kept
    for c in kept:
        n, k = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert n <= max(16, triton.next_power_of_2(out_dim)) and k <= max(16, triton.next_power_of_2(reduce_dim))
        buffers = c.num_stages - (on_a_gpu.arch < 90)  # one buffer fewer before Hopper
        assert buffers * (block_m * k + operands * k * n) * rows.element_size() <= on_a_gpu.shared_budget
    if min(out_dim, reduce_dim) >= 128 and dtype == torch.bfloat16:
        assert len(kept) > 1, "a large bfloat16 GEMM has a choice to time"


def test_an_a100_times_configurations_one_pipeline_buffer_would_not_fit_in():
    """Before Hopper the pipeline keeps one buffer fewer: a configuration that fits only by that one is kept."""
    big = triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3)
    bytes_per_buffer = (64 * 128 + 2 * 128 * 128) * 2  # a 64-row tile and two weight tiles, bfloat16
    part = tuning.GpuPart(80, 2 * bytes_per_buffer)
    assert tuning.gemm_fits(big, 64, 14336, 4096, 2, 2, part)
    assert not tuning.gemm_fits(big, 64, 14336, 4096, 2, 2, part._replace(arch=90))


def test_a_tiny_gemm_keeps_a_tile_that_covers_it(on_a_gpu):
    kept = gemm_pruner("out", "reduce", "rows", 2)(GEMM_CONFIGS, {"out": 8, "reduce": 8, "rows": torch.empty(0)}, BLOCK_M=16)
    assert [c.kwargs for c in kept] == [{"BLOCK_N": 16, "BLOCK_K": 16}]


def test_autotune_off_keeps_the_first_configuration_that_fits(on_a_gpu, monkeypatch):
    gemm_args = {"out": 14336, "reduce": 4096, "rows": torch.empty(0, dtype=torch.bfloat16)}
    attention_args = {"k_ptr": torch.empty(0, dtype=torch.bfloat16)}
    every_gemm = gemm_pruner("out", "reduce", "rows", 2)(GEMM_CONFIGS, gemm_args, BLOCK_M=16)
    every_attention = prune_attention(ATTENTION_CONFIGS, attention_args, BLOCK_M=16, BLOCK_D=64)
    assert len(every_gemm) > 1 and len(every_attention) > 1
    monkeypatch.setenv(tuning.AUTOTUNE_ENV_VAR, "0")
    assert gemm_pruner("out", "reduce", "rows", 2)(GEMM_CONFIGS, gemm_args, BLOCK_M=16) == every_gemm[:1]
    assert prune_attention(ATTENTION_CONFIGS, attention_args, BLOCK_M=16, BLOCK_D=64) == every_attention[:1]


def test_gpu_attention_configurations_fit_shared_memory(on_a_gpu):
    keys = torch.empty(0, dtype=torch.float32)
    kept = prune_attention(ATTENTION_CONFIGS, {"k_ptr": keys}, BLOCK_M=64, BLOCK_D=128)
    assert kept and len(kept) < len(ATTENTION_CONFIGS)
    assert all((64 + c.num_stages * 2 * c.kwargs["BLOCK_N"]) * 128 * 4 <= on_a_gpu.shared_budget for c in kept)
    every = prune_attention(ATTENTION_CONFIGS, {"k_ptr": keys.bfloat16()}, BLOCK_M=16, BLOCK_D=64)
    assert len(every) == len(ATTENTION_CONFIGS)


@pytest.mark.parametrize(
    "rows, experts, want", [(1, 8, 16), (16, 8, 16), (256, 8, 32), (4096, 8, 64), (2, 64, 16), (1024, 128, 16)]
)
def test_the_row_block_follows_the_rows_per_expert(on_a_gpu, rows, experts, want):
    assert gemm_block_m(rows, experts) == want


def test_float32_dots_follow_torchs_matmul_precision(on_a_gpu, matmul_precision):
    matmul_precision("highest")
    assert dot_precision(torch.float32) == "ieee"
    matmul_precision("high")
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "ieee"


def test_the_interpreter_always_multiplies_in_ieee(matmul_precision):
    matmul_precision("high")
    assert dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("block_m", [16, 32, 64])
@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=lambda c: "n{BLOCK_N}-k{BLOCK_K}".format(**c.kwargs))
def test_every_gpu_gemm_tile_computes_the_same_experts(monkeypatch, config, block_m):
    """Each GPU tile shape, run under the interpreter (warps and stages aside): the masks hold at every edge."""
    for kernel in (expert_ffn_module._gate_up_kernel, expert_ffn_module._down_kernel):
        monkeypatch.setattr(kernel, "configs", [config])  # one configuration: the autotuner runs it as it is
    monkeypatch.setattr(expert_ffn_module, "gemm_block_m", lambda rows, experts: block_m)
    T, E, K, D, I = 37, 4, 2, 200, 150
    g = torch.Generator().manual_seed(block_m)
    hidden = torch.randn(T, D, generator=g)
    perm = permute(hidden, torch.randint(0, E, (T, K), generator=g, dtype=torch.int32), E, backend="torch")
    w1, w3 = torch.randn(E, I, D, generator=g) / D**0.5, torch.randn(E, I, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, I, generator=g) / I**0.5
    got = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend="triton")
    want = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert expert_ffn_module._gate_up_kernel.best_config is config and expert_ffn_module._down_kernel.best_config is config


@pytest.mark.parametrize("config", ATTENTION_CONFIGS, ids=lambda c: f"n{c.kwargs['BLOCK_N']}-w{c.num_warps}-s{c.num_stages}")
def test_every_gpu_attention_tile_computes_the_same_attention(monkeypatch, config):
    from moeshard.kernels import PagedLayout

    monkeypatch.setattr(attention_module._paged_attention_kernel, "configs", [config])
    seqs = ((9, 1), (0, 6), (20, 5), (7, 40), (130, 1))
    layout = PagedLayout(
        query_lens=tuple(n for _, n in seqs),
        start_pos=tuple(s for s, _ in seqs),
        block_tables=tuple(tuple(range(10 * b, 10 * b + 9)) for b in range(len(seqs))),
        block_size=16,
        sliding_window=None,
    )
    g = torch.Generator().manual_seed(config.kwargs["BLOCK_N"])
    q = torch.randn(layout.num_tokens, 4, 16, generator=g)
    keys, values = torch.randn(800, 2, 16, generator=g), torch.randn(800, 2, 16, generator=g)
    got = paged_attention(q, keys, values, layout, backend="triton")
    torch.testing.assert_close(got, paged_attention(q, keys, values, layout, backend="torch"), rtol=1e-5, atol=1e-5)
    assert attention_module._paged_attention_kernel.best_config is config


def _keys(kernel) -> set:
    return set(kernel.cache)


def test_the_expert_warm_up_reaches_every_row_block_serving_picks(monkeypatch):
    """With a GPU's row blocks: after the warm-up no call, whatever its rows, meets a key the autotuner has not seen."""
    warmup_module = importlib.import_module("moeshard.kernels.warmup")
    for module in (expert_ffn_module, warmup_module):
        monkeypatch.setattr(module, "gemm_block_m", tuning.rows_per_expert_block)
    kernels = (expert_ffn_module._gate_up_kernel, expert_ffn_module._down_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "cache", {})
    E, D, I = 4, 24, 40
    g = torch.Generator().manual_seed(3)
    w1, w3, w2 = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g)
    assert warmup_module.warm_up_expert_ffn(w1, w3, w2, backend="triton") == 3  # row blocks of 16, 32 and 64
    warmed = [_keys(kernel) for kernel in kernels]
    for T in (1, 2, 5, 16, 33, 100, 300):
        ids = torch.randint(0, E, (T, 2), generator=g, dtype=torch.int32)
        perm = permute(torch.randn(T, D, generator=g), ids, E, backend="torch")
        expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend="triton")
    assert [_keys(kernel) for kernel in kernels] == warmed


def test_the_attention_warm_up_reaches_every_query_tile_serving_picks(monkeypatch):
    from moeshard.kernels import PagedLayout
    from moeshard.kernels.warmup import warm_up_paged_attention

    kernel = attention_module._paged_attention_kernel
    monkeypatch.setattr(kernel, "cache", {})
    H, Hkv, Dh, block, longest = 8, 2, 16, 4, 100
    assert warm_up_paged_attention(H, Hkv, Dh, block, None, longest, torch.float32, torch.device("cpu"), backend="triton") > 1
    warmed = _keys(kernel)
    g = torch.Generator().manual_seed(4)
    for seqs in (((5, 1), (9, 1)), ((0, 3),), ((4, 17), (30, 1)), ((0, 100),), ((0, 64), (3, 36)), ((50, 9),)):
        layout = PagedLayout(
            query_lens=tuple(n for _, n in seqs),
            start_pos=tuple(s for s, _ in seqs),
            block_tables=tuple(tuple(range(40 * b, 40 * b + 38)) for b in range(len(seqs))),
            block_size=block,
        )
        q = torch.randn(layout.num_tokens, H, Dh, generator=g)
        keys = torch.randn(40 * block * len(seqs), Hkv, Dh, generator=g)
        paged_attention(q, keys, torch.randn_like(keys), layout, backend="triton")
    assert _keys(kernel) == warmed


def test_nothing_is_warmed_where_the_kernels_run_on_torch():
    from moeshard.kernels.warmup import warm_up_expert_ffn, warm_up_paged_attention

    w = torch.zeros(2, 8, 8)
    assert warm_up_expert_ffn(w, w, w) == 0
    assert warm_up_paged_attention(4, 2, 16, 16, None, 64, torch.float32, torch.device("cpu")) == 0


def test_compiled_kernels_keep_their_autotuned_choices_on_disk():
    """The setting reaches Triton's autotuner when it compiles (the interpreter turns it off, so a fresh process)."""
    probe = (
        "from moeshard.kernels.expert_ffn import _gate_up_kernel, _down_kernel\n"
        "from moeshard.kernels.paged_attention import _paged_attention_kernel\n"
        "print([k.cache_results for k in (_gate_up_kernel, _down_kernel, _paged_attention_kernel)])"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["[True,", "True,", "True]"]
