"""RMSNorm and the rotary embedding (alone, and with the step's k/v stored into the paged cache): Triton kernels
(under the interpreter) against the torch references, the references against transformers' own modules, and
whole models with every kernel on the Triton path.

Dimensions: T tokens, H heads, Hkv kv heads, Dh head dim, D normalised dim, S cache slots.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm, apply_rotary_pos_emb

from moeshard.cluster import LLM
from moeshard.cluster.model.layers import RotaryEmbedding
from moeshard.kernels import ENV_VAR, rms_norm, rotary, rotary_store

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (33, 576), (5, 3, 24), (3, 5000), (0, 16)], ids=str)
def test_rms_norm_kernel_equals_the_reference(shape, dtype):
    """The kernel rounds where the reference does; only the mean's summation order differs (float32 ulps of
    the variance), so a low-precision output differs in at most a few elements, by one unit in the last place."""
    x, weight = _rows(shape, dtype, seed=sum(shape))
    want = rms_norm(x, weight, 1e-6, backend="torch")
    got = rms_norm(x, weight, 1e-6, backend="triton")
    assert got.shape == want.shape == x.shape and got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        differ = got != want
        assert differ.sum().item() <= 0.01 * differ.numel()
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1)
        assert ((got.float() - want.float()).abs() <= ulp)[differ].all()


def test_rms_norm_of_a_strided_view_and_a_float32_weight():
    """q's per-head norm reads a view of the projection's output; a float32 weight scales in float32."""
    qkv, weight = _rows((7, 5 * 16), torch.bfloat16, seed=3)
    q = qkv[:, : 3 * 16].view(7, 3, 16)  # [T, H, Dh], rows not evenly strided
    for w in (weight[:16], weight[:16].float()):
        want = rms_norm(q, w, 1e-5, backend="torch")
        got = rms_norm(q, w, 1e-5, backend="triton")
        assert got.dtype == want.dtype == torch.promote_types(q.dtype, w.dtype)
        torch.testing.assert_close(got, want, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_is_transformers_rmsnorm(dtype):
    x, weight = _rows((9, 48), dtype, seed=5)
    norm = MixtralRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        want = norm(x)
    assert torch.equal(rms_norm(x, weight, 1e-5, backend="torch"), want)


def _rotary_case(T: int, H: int, Dh: int, dtype: torch.dtype):
    """q as attention has it (a view of the projection's output), and cos/sin at scattered positions."""
    g = torch.Generator().manual_seed(T + H + Dh)
    qkv = torch.randn(T, (H + 2) * Dh, generator=g).to(dtype)
    x = qkv[:, : H * Dh].view(T, H, Dh)  # [T, H, Dh]
    tables = RotaryEmbedding(Dh, 10000.0).tables(torch.arange(T) * 37 + 5, dtype)  # [T, Dh] each
    return x, tables.cos, tables.sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, Dh", [(1, 8, 64), (33, 9, 64), (5, 3, 80), (17, 32, 128), (0, 4, 64)])
def test_rotary_kernel_equals_the_reference_bit_for_bit(T, H, Dh, dtype):
    x, cos, sin = _rotary_case(T, H, Dh, dtype)
    want = rotary(x, cos, sin, backend="torch")
    got = rotary(x, cos, sin, backend="triton")
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reference_is_transformers_apply_rotary_pos_emb(dtype):
    x, cos, sin = _rotary_case(11, 4, 32, dtype)
    theirs, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])  # [1, H, T, Dh]
    assert torch.equal(rotary(x, cos, sin, backend="torch"), theirs[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, Hkv, Dh", [(1, 8, 2, 64), (33, 9, 3, 64), (5, 4, 4, 80), (6, 80, 8, 128), (0, 4, 2, 64)])
def test_rotary_store_kernel_equals_rotary_and_index_copy_bit_for_bit(T, H, Hkv, Dh, dtype):
    """q, k, v as attention has them (views of one projection's output); the step's slots scattered over a cache
    that already holds other keys, which must be left as they were. 80 heads take two tiles of a program."""
    g = torch.Generator().manual_seed(T + H + Hkv + Dh)
    qkv = torch.randn(T, (H + 2 * Hkv) * Dh, generator=g).to(dtype)
    q, k, v = qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=1)
    q, k, v = q.view(T, H, Dh), k.view(T, Hkv, Dh), v.view(T, Hkv, Dh)  # [T, H|Hkv, Dh], rows strided
    tables = RotaryEmbedding(Dh, 10000.0).tables(torch.arange(T) * 37 + 5, dtype)  # [T, Dh] each
    slots = torch.randperm(3 * T + 4, generator=g)[:T]  # [T] distinct, out of order
    caches = {}
    for backend in ("torch", "triton"):
        g_cache = torch.Generator().manual_seed(1)
        keys, values = (torch.randn(3 * T + 4, Hkv, Dh, generator=g_cache).to(dtype) for _ in range(2))  # [S, Hkv, Dh]
        q_out = rotary_store(q, k, v, tables.cos, tables.sin, slots, keys, values, backend=backend)
        caches[backend] = (q_out, keys, values)
    (q_want, keys_want, values_want), (q_got, keys_got, values_got) = caches["torch"], caches["triton"]
    assert q_got.shape == (T, H, Dh) and q_got.dtype == dtype
    assert torch.equal(q_got, q_want) and torch.equal(keys_got, keys_want) and torch.equal(values_got, values_want)
    # the reference is the attention layer's former ops: each rotation alone, then the two index copies
    assert torch.equal(q_want, rotary(q, tables.cos, tables.sin, backend="torch"))
    assert torch.equal(keys_want[slots], rotary(k, tables.cos, tables.sin, backend="torch"))
    assert torch.equal(values_want[slots], v)


@pytest.mark.parametrize(
    "architecture, overrides",
    [(None, {}), ("Qwen3MoeForCausalLM", {}), ("OlmoeForCausalLM", {"clip_qkv": 0.8})],
    ids=["mixtral", "qwen3-per-head-qk-norm", "olmoe-whole-qk-norm"],
)
def test_a_model_on_the_triton_path_equals_the_torch_path(
    architecture, overrides, tiny_family_factory, tiny_mixtral_dir, monkeypatch
):  # fmt: skip
    """Every kernel of a step on Triton (norms, rotary, paged attention, route, permute, grouped SwiGLU,
    combine), as on a GPU: the logits of a prompt equal the torch path's within float32 summation order."""
    path = tiny_mixtral_dir
    if architecture is not None:
        path = tiny_family_factory(f"triton_path_{architecture}", architecture, seed=4, **overrides)
    prompt = [1, 5, 9, 33, 17, 2, 8]
    with LLM(path) as llm:
        want = llm.logits(prompt)
    calls = []
    for name in ("rms_norm_triton", "rotary_store_triton"):
        module = importlib.import_module(f"moeshard.kernels.{name.removesuffix('_triton')}")
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
    monkeypatch.setenv(ENV_VAR, "triton")
    with LLM(path) as llm:
        got = llm.logits(prompt)
    assert {"rms_norm_triton", "rotary_store_triton"} <= set(calls)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
