"""combine: Triton kernel vs torch reference vs a per-token Python loop.

Dimensions: T tokens, D hidden, E experts, K chosen per token, N rows.
"""

from __future__ import annotations

import pytest
import torch

from moeshard.kernels import combine, permute, route

DIMS = (1, 33, 100, 257)
EXPERTS = (1, 4, 8, 64)
DTYPES = (torch.float32, torch.bfloat16)
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def ks(E: int) -> list[int]:
    return sorted({k for k in (1, 2, 8, E) if k <= E})


def sweep_cases() -> list:
    """T in {1, 2, 33} crossed with every E, K and dtype (D cycling); larger T sampled."""
    small = [(T, E, K, dtype) for T in (1, 2, 33) for E in EXPERTS for K in ks(E) for dtype in DTYPES]
    cases = [(T, E, K, DIMS[i % len(DIMS)], dtype) for i, (T, E, K, dtype) in enumerate(small)]
    cases += [
        (511, 8, 2, 257, torch.bfloat16), (511, 64, 8, 100, torch.float32), (511, 4, 4, 33, torch.float32),
        (511, 64, 64, 1, torch.bfloat16), (2048, 8, 2, 100, torch.float32), (2048, 8, 8, 33, torch.bfloat16),
        (2048, 64, 8, 257, torch.bfloat16), (2048, 1, 1, 257, torch.float32), (2048, 64, 64, 33, torch.float32),
        (33, 128, 8, 100, torch.float32), (511, 128, 8, 64, torch.bfloat16),  # many small experts
    ]  # fmt: skip
    return [pytest.param(*c, id=f"T{c[0]}-E{c[1]}-K{c[2]}-D{c[3]}-{str(c[4])[6:]}") for c in cases]


def naive_combine(expert_out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Per token: the float32 sum over its sent choices, in j order, cast back."""
    T, D = slot.shape[0], expert_out.shape[1]
    out = torch.zeros(T, D, dtype=torch.float32)
    for t in range(T):
        for j, n in enumerate(slot[t].tolist()):
            if n >= 0:
                out[t] += weights[t, j] * expert_out[n].float()
    return out.to(expert_out.dtype)


def naive_combine_fast(expert_out: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The same per-token loop, vectorised over j (for the larger cases)."""
    out = torch.zeros(slot.shape[0], expert_out.shape[1], dtype=torch.float32)
    for t in range(slot.shape[0]):
        sent = slot[t] >= 0
        out[t] = (weights[t, sent, None] * expert_out[slot[t, sent]].float()).sum(0)
    return out.to(expert_out.dtype)


def run_both(expert_out, weights, perm) -> dict[str, torch.Tensor]:
    got = {}
    for backend in ("triton", "torch"):
        out = torch.full((weights.shape[0], expert_out.shape[1]), float("nan"), dtype=expert_out.dtype)
        got[backend] = combine(expert_out, weights, perm, backend=backend, out=out)
        assert got[backend] is out
    return got


def check_combine(expert_out, weights, perm, want) -> None:
    got = run_both(expert_out, weights, perm)
    torch.testing.assert_close(got["triton"], want, **TOL[expert_out.dtype])
    torch.testing.assert_close(got["torch"], want, **TOL[expert_out.dtype])
    if expert_out.dtype == torch.bfloat16:  # the two backends round the same float32 sums
        torch.testing.assert_close(got["triton"], got["torch"], rtol=1e-2, atol=1e-3)


def routed(T: int, E: int, K: int, D: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    routing = route(torch.randn(T, E), K)
    perm = permute(torch.randn(T, D).to(dtype), routing.expert_ids, E)
    expert_out = torch.randn(perm.num_rows, D).to(dtype)
    return expert_out, routing.weights, perm


@pytest.mark.parametrize("T, E, K, D, dtype", sweep_cases())
def test_combine_sweep(T, E, K, D, dtype):
    expert_out, weights, perm = routed(T, E, K, D, dtype, seed=T + E + K + D)
    naive = naive_combine if T * K <= 4096 else naive_combine_fast
    check_combine(expert_out, weights, perm, naive(expert_out, weights, perm.slot))


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_not_sent(dtype):
    T, E, D = 300, 8, 100
    torch.manual_seed(7)
    routing = route(torch.randn(T, E), 2)
    ids = routing.expert_ids.clone()
    ids[torch.rand(T, 2) < 0.3] = -1
    ids[5] = -1  # a token with no row: zeros
    perm = permute(torch.randn(T, D).to(dtype), ids, E)
    expert_out = torch.randn(perm.num_rows, D).to(dtype)
    expert_out[0] = float("inf")  # an unsent choice must never read a row, not even row 0
    want = naive_combine(expert_out, routing.weights, perm.slot)
    got = run_both(expert_out, routing.weights, perm)
    for out in got.values():
        assert (out[5] == 0).all()
        torch.testing.assert_close(out, want, **TOL[dtype])
    nothing = permute(torch.randn(T, D).to(dtype), torch.full((T, 2), -1), E)
    for out in run_both(torch.empty(0, D, dtype=dtype), routing.weights, nothing).values():
        assert (out == 0).all()


def test_combine_all_tokens_on_one_expert_and_empty_experts():
    T, D = 200, 65
    weights = torch.rand(T, 2)
    perm = permute(torch.randn(T, D), torch.tensor([[6, 2]]).repeat(T, 1), 8)  # experts 0, 1, 3-5, 7 empty
    expert_out = torch.randn(perm.num_rows, D)
    check_combine(expert_out, weights, perm, naive_combine(expert_out, weights, perm.slot))


def test_combine_is_deterministic_and_weights_may_be_strided():
    expert_out, weights, perm = routed(511, 8, 2, 257, torch.float32, seed=8)
    wide = torch.zeros(511, 4)
    wide[:, ::2] = weights
    a = combine(expert_out, wide[:, ::2], perm, backend="triton")
    b = combine(expert_out, weights, perm, backend="triton")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, naive_combine_fast(expert_out, weights, perm.slot), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1, 33, 300])
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_combine_writes_another_dtype(T, in_dtype, out_dtype):
    """An actor keeps its partial sums in float32 (bf16 rows in); the coordinator rounds float32 partials to bf16:
    the float32 sum in the output's dtype, on both backends, at T = 1 (the lone-token path) too."""
    expert_out, weights, perm = routed(T, 8, 2, 100, in_dtype, seed=T)
    sums = naive_combine(expert_out.float(), weights, perm.slot)  # [T, D] float32
    for backend in ("triton", "torch"):
        got = combine(expert_out, weights, perm, backend=backend, dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == sums.shape
        torch.testing.assert_close(got, sums.to(out_dtype), **TOL[out_dtype])
    with pytest.raises(AssertionError):
        combine(expert_out, weights, perm, out=torch.empty(T, 100, dtype=in_dtype), dtype=out_dtype)  # disagree
