"""The compiled Triton kernels on a GPU against their torch references on the same CUDA tensors.

Float32 runs twice: with torch's default matmul precision ("highest": IEEE float32 in the kernels and
cuBLAS) and with "high" (TF32 on the tensor cores in both), each against its own tolerance.
"""

from __future__ import annotations

import pytest
import torch

from moeshard.kernels import PagedLayout, combine, expert_ffn, paged_attention, permute, rms_norm, rotary, rotary_store, route

SHAPES = [(1, 8, 2, 64, 96), (33, 8, 2, 512, 1024), (257, 64, 8, 256, 128), (1024, 128, 8, 512, 256)]  # T, E, K, D, I
PRECISIONS = [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")]
TOLERANCE = {"highest": {torch.float32: 1e-4, torch.bfloat16: 3e-2}, "high": {torch.float32: 3e-3}}


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype, precision", PRECISIONS, ids=lambda p: str(p).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_moe_layer_compiled_equals_torch(compiled_triton, matmul_precision, shape, dtype, precision):
    matmul_precision(precision)
    T, E, K, D, I = shape
    g = torch.Generator(device="cuda").manual_seed(T * E)
    hidden = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=g)
    w1, w3 = (torch.randn(E, I, D, device="cuda", generator=g).div(D**0.5).to(dtype) for _ in range(2))
    w2 = torch.randn(E, D, I, device="cuda", generator=g).div(I**0.5).to(dtype)

    outputs = {}
    for backend in ("triton", "torch"):
        routing = route(logits, K, backend=backend)
        perm = permute(hidden, routing.expert_ids, E, backend=backend)
        rows = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend=backend, host_offsets=perm.host_offsets)
        outputs[backend] = (routing, perm, combine(rows, routing.weights, perm, backend=backend))
    (r_t, p_t, out_t), (r_ref, p_ref, out_ref) = outputs["triton"], outputs["torch"]
    assert torch.equal(r_t.expert_ids.long(), r_ref.expert_ids.long())
    torch.testing.assert_close(r_t.weights, r_ref.weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(p_t.rows, p_ref.rows) and torch.equal(p_t.expert_offsets, p_ref.expert_offsets)
    scale = out_ref.float().abs().max().item()
    assert (out_t.float() - out_ref.float()).abs().max().item() <= TOLERANCE[precision][dtype] * max(scale, 1.0)


@pytest.mark.parametrize("T, K, E", [(1, 2, 8), (32, 2, 8), (64, 8, 128), (512, 2, 8), (513, 2, 8), (4096, 2, 8)])
def test_the_plan_of_device_ids_equals_the_torch_steps(T, K, E):
    """A decode step's few ids are planned on the host and copied back as one tensor; more on the device. Both
    give the torch steps' plan, on the ids' device."""
    from moeshard.kernels.permute import _plan_permutation_torch, plan_permutation

    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.randint(-1, E, (T, K), device="cuda", generator=g, dtype=torch.int32)
    got, want = plan_permutation(ids, E), _plan_permutation_torch(ids, E)
    for a, b in zip(got[:3], want[:3]):
        assert a.device == ids.device and a.dtype == torch.int64 and torch.equal(a, b)
    assert got.host_offsets == want.host_offsets


# (start position, queries) per sequence: decode tokens, a prefill from 0, chunks with history, a long chunk
MIXED_STEP = ((9, 1), (0, 6), (20, 5), (33, 1), (7, 17), (0, 130), (300, 1), (64, 70))


@pytest.mark.parametrize("dtype, precision", PRECISIONS, ids=lambda p: str(p).removeprefix("torch."))
@pytest.mark.parametrize("heads, kv_heads, head_dim, window", [(32, 8, 128, None), (16, 4, 64, 24), (12, 12, 80, None)])
def test_paged_attention_compiled_equals_torch(
    compiled_triton, matmul_precision, heads, kv_heads, head_dim, window, dtype, precision
):
    matmul_precision(precision)
    block_size = 16
    g = torch.Generator(device="cuda").manual_seed(heads * head_dim)
    needs = [-(-(start + n) // block_size) for start, n in MIXED_STEP]
    order = torch.randperm(sum(needs), device="cuda", generator=g).tolist()
    tables, used = [], 0
    for need in needs:
        tables.append(tuple(order[used : used + need]))
        used += need
    layout = PagedLayout(
        query_lens=tuple(n for _, n in MIXED_STEP), start_pos=tuple(s for s, _ in MIXED_STEP),
        block_tables=tuple(tables), block_size=block_size, sliding_window=window, device=torch.device("cuda"),
    )  # fmt: skip
    slots = sum(needs) * block_size
    keys, values = (torch.randn(slots, kv_heads, head_dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    q = torch.randn(layout.num_tokens, heads, head_dim, device="cuda", generator=g).to(dtype)
    got = paged_attention(q, keys, values, layout, backend="triton")
    want = paged_attention(q, keys, values, layout, backend="torch")
    tolerance = {"highest": {torch.float32: 1e-4, torch.bfloat16: 2e-2}, "high": {torch.float32: 5e-3}}[precision][dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_rms_norm_and_rotary_compiled_equal_torch(compiled_triton, dtype):
    """Both round where torch's ops round: rotary bit for bit (no fused multiply-add), RMSNorm but for the
    mean's summation order. In bfloat16 and float16 that order shows in few elements, by one unit in the last
    place; in float32 it moves a row's variance by a few float32 units, and every element of the row with it
    (an H200 measured up to 5 units, in up to 40% of the elements, at D = 576 to 5120)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    for shape in ((1, 4096), (37, 576), (64, 5120), (9, 32, 128), (256, 4096)):
        x = torch.randn(*shape, device="cuda", generator=g).mul(3).to(dtype)
        weight = torch.rand(shape[-1], device="cuda", generator=g).add(0.5).to(dtype)
        got, want = rms_norm(x, weight, 1e-5, backend="triton"), rms_norm(x, weight, 1e-5, backend="torch")
        assert got.dtype == want.dtype
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp(min=1)
        if dtype == torch.float32:
            assert ((got - want).abs() <= 8 * ulp).all(), shape
        else:
            assert ((got.float() - want.float()).abs() <= 2 * ulp).all(), shape
            assert (got != want).sum().item() <= 0.01 * got.numel() + 1, shape
    for T, H, Dh in ((1, 32, 128), (300, 8, 64), (17, 9, 80)):
        qkv = torch.randn(T, (H + 2) * Dh, device="cuda", generator=g).to(dtype)
        x = qkv[:, : H * Dh].view(T, H, Dh)  # a view, as attention's q is
        angles = torch.rand(T, Dh // 2, device="cuda", generator=g).mul(100).repeat(1, 2)  # [T, Dh]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        assert torch.equal(rotary(x, cos, sin, backend="triton"), rotary(x, cos, sin, backend="torch")), (T, H, Dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_rotary_store_compiled_equals_rotary_and_index_copy(compiled_triton, dtype):
    """One launch: q rotated, k rotated and v stored into scattered cache slots, bit for bit as the torch ops."""
    g = torch.Generator(device="cuda").manual_seed(4)
    for T, H, Hkv, Dh in ((1, 32, 8, 128), (300, 8, 2, 64), (17, 9, 3, 80), (5, 80, 8, 128)):
        qkv = torch.randn(T, (H + 2 * Hkv) * Dh, device="cuda", generator=g).to(dtype)
        q, k, v = (z.view(T, -1, Dh) for z in qkv.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=1))  # views, as attention's
        angles = torch.rand(T, Dh // 2, device="cuda", generator=g).mul(100).repeat(1, 2)  # [T, Dh]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        slots = torch.randperm(2 * T + 3, device="cuda", generator=g)[:T]
        results = []
        for backend in ("triton", "torch"):
            caches = [torch.zeros(2 * T + 3, Hkv, Dh, device="cuda", dtype=dtype) + i for i in (1, 2)]  # [S, Hkv, Dh]
            results.append((rotary_store(q, k, v, cos, sin, slots, *caches, backend=backend), *caches))
        for got, want in zip(*results):
            assert torch.equal(got, want), (T, H, Hkv, Dh)
