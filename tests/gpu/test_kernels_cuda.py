"""The compiled Triton kernels on a GPU against their torch references on the same CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from moeshard.kernels import combine, expert_ffn, permute, route

SHAPES = [(1, 8, 2, 64, 96), (33, 8, 2, 512, 1024), (257, 64, 8, 256, 128), (1024, 128, 8, 512, 256)]  # T, E, K, D, I
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # float32 matmuls may use TF32 in the kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_moe_layer_compiled_equals_torch(compiled_triton, shape, dtype):
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
        rows = expert_ffn(perm.rows, perm.expert_offsets, w1, w3, w2, backend=backend)
        outputs[backend] = (routing, perm, combine(rows, routing.weights, perm, backend=backend))
    (r_t, p_t, out_t), (r_ref, p_ref, out_ref) = outputs["triton"], outputs["torch"]
    assert torch.equal(r_t.expert_ids.long(), r_ref.expert_ids.long())
    torch.testing.assert_close(r_t.weights, r_ref.weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(p_t.rows, p_ref.rows) and torch.equal(p_t.expert_offsets, p_ref.expert_offsets)
    scale = out_ref.float().abs().max().item()
    assert (out_t.float() - out_ref.float()).abs().max().item() <= TOLERANCE[dtype] * max(scale, 1.0)
