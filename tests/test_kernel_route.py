"""route: Triton kernel vs torch reference vs a per-token Python loop vs transformers' MixtralTopKRouter.

Dimensions: T tokens, D hidden, E experts, K chosen per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from moeshard.kernels import RouterOutput, route

EXPERTS = (1, 4, 8, 64)


def ks(E: int) -> list[int]:
    return sorted({k for k in (1, 2, 8, E) if k <= E})


# Small T crossed fully with E, K and dtype; T = 511 and 2048 crossed with E and K in one dtype each.
CASES = [
    pytest.param(T, E, K, dtype, id=f"T{T}-E{E}-K{K}-{str(dtype)[6:]}")
    for T, dtypes in ((1, (torch.float32, torch.bfloat16)), (2, (torch.float32, torch.bfloat16)),
                      (33, (torch.float32, torch.bfloat16)), (511, (torch.bfloat16,)), (2048, (torch.float32,)))
    for E in EXPERTS
    for K in ks(E)
    for dtype in dtypes
]  # fmt: skip


def poisoned_output(T: int, K: int) -> RouterOutput:
    return RouterOutput(torch.full((T, K), float("nan")), torch.full((T, K), -7, dtype=torch.int32))


def naive_route(logits: torch.Tensor, k: int) -> RouterOutput:
    """Per token: the k largest logits (lowest id first among equal ones), softmax over them."""
    weights, ids = [], []
    for row in logits.float().tolist():
        chosen = sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]
        top = row[chosen[0]]
        p = [math.exp(row[e] - top) for e in chosen]
        weights.append([x / sum(p) for x in p])
        ids.append(chosen)
    return RouterOutput(
        torch.tensor(weights, dtype=torch.float32).view(-1, k), torch.tensor(ids, dtype=torch.int32).view(-1, k)
    )


def assert_same_choice(logits: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    """Each position picks an expert with the same logit (ids may differ only between equal logits)."""
    assert got.shape == want.shape
    rows = torch.sort(got.long(), dim=1).values
    assert (rows[:, 1:] != rows[:, :-1]).all(), "an expert chosen twice"
    logits = logits.float()
    torch.testing.assert_close(logits.gather(1, got.long()), logits.gather(1, want.long()), rtol=0, atol=0)


@pytest.mark.parametrize("T, E, K, dtype", CASES)
def test_route_sweep(T, E, K, dtype):
    torch.manual_seed(T * 1000 + E * 10 + K)
    logits = (3 * torch.randn(T, E)).to(dtype)  # bf16 makes equal logits likely: exercises ties
    want = naive_route(logits, K)
    tri = route(logits, K, backend="triton", out=poisoned_output(T, K))
    ref = route(logits, K, backend="torch", out=poisoned_output(T, K))
    assert torch.equal(tri.expert_ids, want.expert_ids)
    torch.testing.assert_close(tri.weights, want.weights, rtol=1e-6, atol=1e-6)
    assert_same_choice(logits, ref.expert_ids, want.expert_ids)
    torch.testing.assert_close(ref.weights, want.weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("E, K", [(8, 2), (8, 8), (64, 8), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_transformers_router(E, K, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    T, D = 257, 48
    torch.manual_seed(E + K)
    config = MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=K)
    router = MixtralTopKRouter(config).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D) / D**0.5)
        hidden = torch.randn(T, D, dtype=dtype)
        logits, hf_weights, hf_ids = router(hidden)
    ref = route(logits, K, backend="torch")
    assert torch.equal(ref.expert_ids, hf_ids.to(torch.int32))
    assert torch.equal(ref.weights, hf_weights)
    tri = route(logits, K, backend="triton")
    assert_same_choice(logits, tri.expert_ids, hf_ids)
    torch.testing.assert_close(tri.weights, hf_weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("E, K", [(64, 8), (128, 8), (8, 2)])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_route_matches_fine_grained_routers(family, E, K, norm_topk_prob):
    """Qwen-MoE and OLMoE keep the softmax over all E unless norm_topk_prob renormalises the k chosen."""
    import importlib

    import transformers

    T, D = 129, 40
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    router_cls = next(getattr(module, n) for n in dir(module) if n.endswith("TopKRouter"))
    config_cls = getattr(transformers, {"qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig"}[family])
    config = config_cls(hidden_size=D, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(E + K + norm_topk_prob)
    router = router_cls(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D) / D**0.5)
        logits, hf_weights, hf_ids = router(torch.randn(T, D))
    ref = route(logits, K, normalize=norm_topk_prob, backend="torch")
    assert torch.equal(ref.expert_ids, hf_ids.to(torch.int32))
    assert torch.equal(ref.weights, hf_weights)
    tri = route(logits, K, normalize=norm_topk_prob, backend="triton")
    assert_same_choice(logits, tri.expert_ids, hf_ids)
    torch.testing.assert_close(tri.weights, hf_weights, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hf_weights.sum(-1), torch.ones(T)) == norm_topk_prob


def test_route_ties_take_the_lowest_id_on_triton():
    logits = torch.tensor([[0.0] * 8, [1, 2, 2, 1, 2, 0, 1, 1], [5, 5, 5, 5, -1, -1, 9, 9]])
    tri = route(logits, 4, backend="triton")
    assert tri.expert_ids.tolist() == [[0, 1, 2, 3], [1, 2, 4, 0], [6, 7, 0, 1]]
    ref = route(logits, 4, backend="torch")
    assert_same_choice(logits, ref.expert_ids, tri.expert_ids)
    torch.testing.assert_close(tri.weights, ref.weights, rtol=1e-6, atol=1e-6)


def test_route_masked_logits_get_zero_weight():
    logits = torch.full((3, 8), float("-inf"))
    logits[:, 5] = 1.0
    logits[1, 2] = 3.0
    for backend in ("triton", "torch"):
        got = route(logits, 3, backend=backend, out=poisoned_output(3, 3))
        assert got.expert_ids[:, 0].tolist() == [5, 2, 5]
        assert got.weights[:, 0].tolist()[::2] == [1.0, 1.0]
        assert (got.weights[:, 2] == 0).all()
        assert (torch.sort(got.expert_ids.long(), 1).values.diff(dim=1) > 0).all()


def test_route_strided_logits_and_empty_batch():
    logits = torch.randn(40, 16)[:, ::2]  # [40, 8], stride 2 along E
    tri = route(logits, 2, backend="triton")
    assert torch.equal(tri.expert_ids, naive_route(logits, 2).expert_ids)
    for backend in ("triton", "torch"):
        empty = route(torch.empty(0, 8), 2, backend=backend)
        assert empty.weights.shape == (0, 2) and empty.expert_ids.shape == (0, 2)


def test_route_rejects_bad_k():
    with pytest.raises(AssertionError):
        route(torch.randn(4, 8), 9)
    with pytest.raises(AssertionError):
        route(torch.randn(4, 8), 0)
