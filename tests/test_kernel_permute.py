"""permute and dedupe_destinations: Triton gather vs torch reference vs per-token Python buckets.

Dimensions: T tokens, D hidden, E experts (destinations), K chosen per token, N rows.
"""

from __future__ import annotations

import pytest
import torch

from moeshard.kernels import dedupe_destinations, permute, plan_permutation
from moeshard.kernels.permute import _plan_permutation_on_host, _plan_permutation_torch

DIMS = (1, 33, 100, 257)
EXPERTS = (1, 4, 8, 64)
DTYPES = (torch.float32, torch.bfloat16)


def ks(E: int) -> list[int]:
    return sorted({k for k in (1, 2, 8, E) if k <= E})


def sweep_cases() -> list:
    """T in {1, 2, 33} crossed with every E, K and dtype (D cycling); larger T sampled."""
    cases = []
    small = [(T, E, K, dtype) for T in (1, 2, 33) for E in EXPERTS for K in ks(E) for dtype in DTYPES]
    for i, (T, E, K, dtype) in enumerate(small):
        cases.append((T, E, K, DIMS[i % len(DIMS)], dtype))
    cases += [
        (511, 8, 2, 257, torch.bfloat16), (511, 64, 8, 100, torch.float32), (511, 4, 4, 33, torch.float32),
        (511, 64, 64, 1, torch.bfloat16), (2048, 8, 2, 100, torch.float32), (2048, 8, 8, 33, torch.bfloat16),
        (2048, 64, 8, 257, torch.bfloat16), (2048, 1, 1, 257, torch.float32), (2048, 64, 64, 33, torch.float32),
        (33, 128, 8, 100, torch.float32), (511, 128, 8, 64, torch.bfloat16),  # many small experts
    ]  # fmt: skip
    return [pytest.param(*c, id=f"T{c[0]}-E{c[1]}-K{c[2]}-D{c[3]}-{str(c[4])[6:]}") for c in cases]


def random_choices(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """[T, K] distinct experts per token, like a router's top-k."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).topk(K, dim=1).indices


def naive_permute(hidden: torch.Tensor, dest_ids: torch.Tensor, num_dest: int):
    """Buckets per destination filled token by token: (rows, offsets, source_token, slot)."""
    buckets = [[] for _ in range(num_dest)]
    for t, row in enumerate(dest_ids.tolist()):
        for j, d in enumerate(row):
            if d >= 0:
                buckets[d].append((t, j))
    order = [pair for bucket in buckets for pair in bucket]
    offsets = [0]
    for bucket in buckets:
        offsets.append(offsets[-1] + len(bucket))
    slot = [[-1] * dest_ids.shape[1] for _ in range(dest_ids.shape[0])]
    for n, (t, j) in enumerate(order):
        slot[t][j] = n
    tokens = torch.tensor([t for t, _ in order], dtype=torch.int64)
    return hidden[tokens], torch.tensor(offsets), tokens, torch.tensor(slot, dtype=torch.int64).view(dest_ids.shape)


def check_permute(hidden: torch.Tensor, dest_ids: torch.Tensor, num_dest: int) -> None:
    rows, offsets, tokens, slot = naive_permute(hidden, dest_ids, num_dest)
    for backend in ("triton", "torch"):
        out = torch.full((rows.shape[0], hidden.shape[1]), float("nan"), dtype=hidden.dtype)
        perm = permute(hidden, dest_ids, num_dest, backend=backend, out=out)
        assert perm.rows is out and torch.equal(perm.rows, rows), backend
        assert torch.equal(perm.expert_offsets, offsets) and perm.expert_offsets.dtype == torch.int64
        assert perm.dest_offsets is perm.expert_offsets and perm.num_dest == num_dest
        assert perm.host_offsets == tuple(offsets.tolist())
        assert torch.equal(perm.source_token, tokens) and perm.source_token.dtype == torch.int64
        assert torch.equal(perm.slot, slot) and perm.slot.dtype == torch.int64


@pytest.mark.parametrize("T, E, K, D, dtype", sweep_cases())
def test_permute_sweep(T, E, K, D, dtype):
    hidden = torch.randn(T, D).to(dtype)
    check_permute(hidden, random_choices(T, E, K, seed=T + E + K + D), E)


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_empty_and_full_experts(dtype):
    hidden = torch.randn(100, 65).to(dtype)
    ids = random_choices(100, 6, 2, seed=1) + 1  # experts 0 and 7 get no tokens
    check_permute(hidden, ids, 8)
    check_permute(hidden, torch.full((100, 1), 3), 8)  # every token on one expert
    check_permute(hidden, torch.tensor([[2, 2, 5]]).repeat(100, 1), 8)  # repeats within a row are rows too


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_not_sent(dtype):
    hidden = torch.randn(300, 100).to(dtype)
    ids = random_choices(300, 8, 2, seed=2)
    ids[torch.rand(300, 2, generator=torch.Generator().manual_seed(3)) < 0.3] = -1
    ids[7] = -1  # a token sent nowhere
    check_permute(hidden, ids, 8)
    check_permute(hidden, torch.full((300, 2), -1), 8)  # nothing sent: N = 0
    perm = permute(hidden, torch.full((300, 2), -1), 8, backend="triton")
    assert perm.rows.shape == (0, 100) and perm.expert_offsets.tolist() == [0] * 9


def test_permute_int32_ids_strided_hidden_and_empty_batch():
    hidden = torch.randn(50, 200)[:, ::2]  # [50, 100], stride 2 along D
    check_permute(hidden, random_choices(50, 8, 2, seed=4).to(torch.int32), 8)
    for backend in ("triton", "torch"):
        perm = permute(torch.empty(0, 16), torch.empty(0, 2, dtype=torch.int64), 4, backend=backend)
        assert perm.rows.shape == (0, 16) and perm.slot.shape == (0, 2)


def test_permute_rejects_out_of_range_ids():
    with pytest.raises(AssertionError):
        permute(torch.randn(4, 8), torch.tensor([[0], [1], [4], [2]]), 4)
    with pytest.raises(AssertionError):
        permute(torch.randn(4, 8), torch.tensor([[0], [1], [-2], [2]]), 4)


@pytest.mark.parametrize(
    "T, K, num_dest, id_dtype",
    [(0, 2, 4, torch.int64), (1, 2, 8, torch.int32), (16, 2, 8, torch.int64), (33, 8, 128, torch.int32),
     (2048, 2, 8, torch.int64), (7, 3, 1, torch.int64)],
)  # fmt: skip
def test_plan_on_cpu_equals_the_torch_steps(T, K, num_dest, id_dtype):
    """On the CPU the plan is made in numpy; the torch steps (what other devices run) must give the same plan."""
    g = torch.Generator().manual_seed(T + K)
    ids = torch.randint(-1, num_dest, (T, K), generator=g).to(id_dtype)  # -1: not sent
    before = ids.clone()
    fast, steps = plan_permutation(ids, num_dest), _plan_permutation_torch(ids, num_dest)
    packed = _plan_permutation_on_host(ids, num_dest)  # what a device's few ids take: the plan copied as one tensor
    for plan in (fast, packed):
        for got, want in zip(plan[:3], steps[:3]):
            assert got.dtype == want.dtype == torch.int64 and got.shape == want.shape and torch.equal(got, want)
    for plan in (fast, steps, packed):  # the offsets the host sync brought back are the tensor's
        assert plan.host_offsets == tuple(plan.expert_offsets.tolist()) and all(type(o) is int for o in plan.host_offsets)
    assert torch.equal(ids, before)  # the caller's ids are not touched
    for plan in (plan_permutation, _plan_permutation_torch, _plan_permutation_on_host):
        for bad in (num_dest, -2):
            with pytest.raises(AssertionError):
                plan(torch.tensor([[0], [bad]]), num_dest)


def naive_dedupe(dest_ids: torch.Tensor) -> torch.Tensor:
    out = []
    for row in dest_ids.tolist():
        seen: set[int] = set()
        kept = []
        for d in row:
            kept.append(-1 if d in seen else d)
            seen.add(d)
        out.append(kept)
    return torch.tensor(out, dtype=dest_ids.dtype).view(dest_ids.shape)


def test_dedupe_destinations():
    ids = torch.tensor([[1, 1, 2, 1], [0, -1, -1, 0], [3, 2, 1, 0], [2, 2, 2, 2]])
    assert dedupe_destinations(ids).tolist() == [[1, -1, 2, -1], [0, -1, -1, -1], [3, 2, 1, 0], [2, -1, -1, -1]]
    g = torch.Generator().manual_seed(5)
    for T, K, A in ((1, 1, 1), (33, 2, 2), (511, 8, 3), (64, 64, 16)):
        ids = torch.randint(-1, A, (T, K), generator=g)
        assert torch.equal(dedupe_destinations(ids), naive_dedupe(ids))
    assert dedupe_destinations(torch.empty(0, 2, dtype=torch.int64)).shape == (0, 2)


def test_group_by_actor_sends_each_token_once_per_actor():
    """Experts -> actors -> dedupe -> permute: every (token, actor) pair exactly once."""
    T, E, K, actors = 200, 8, 2, 3
    expert_to_actor = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    expert_ids = random_choices(T, E, K, seed=6)
    dest = dedupe_destinations(expert_to_actor[expert_ids])  # [T, K]
    hidden = torch.randn(T, 40)
    check_permute(hidden, dest, actors)
    perm = permute(hidden, dest, actors, backend="triton")
    pairs = {(t, a) for t, row in enumerate(expert_to_actor[expert_ids].tolist()) for a in row}
    assert perm.num_rows == len(pairs)
    off = perm.dest_offsets.tolist()
    got = {(t, a) for a in range(actors) for t in perm.source_token[off[a] : off[a + 1]].tolist()}
    assert got == pairs
