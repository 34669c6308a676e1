"""route: the router's top-k.

    w, ids = topk(softmax(logits), k);  w /= w.sum()     (== softmax over the k largest logits)

``normalize=False`` skips the renormalisation: the k weights are the softmax
probabilities over all E (Qwen-MoE and OLMoE with ``norm_topk_prob`` false).

Dimensions: T tokens, E experts, K chosen per token.

Both backends compute in float32 whatever the logits' dtype and return the k
choices in descending weight. Ties: the torch reference is transformers' own
computation (softmax over all E, ``torch.topk``, renormalise), so it returns
transformers' ids bit for bit, including its tie order; the Triton kernel takes
the lowest expert id among equal logits. Away from exact ties the two agree.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeshard.kernels.backend import resolve_backend, tile_rows

logger = logging.getLogger(__name__)


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, K] float32, descending; each row sums to 1 when normalised
    expert_ids: torch.Tensor  # [T, K] int32


def route(
    router_logits: torch.Tensor,
    k: int,
    *,
    normalize: bool = True,
    backend: str = "auto",
    out: RouterOutput | None = None,
) -> RouterOutput:
    """router_logits [T, E] (any float dtype) -> the k chosen experts of each token and their weights."""
    assert router_logits.dim() == 2 and router_logits.is_floating_point(), router_logits.shape
    T, E = router_logits.shape
    assert 1 <= k <= E, f"k={k} must be in [1, E={E}]"
    if out is None:
        out = RouterOutput(
            weights=torch.empty(T, k, dtype=torch.float32, device=router_logits.device),
            expert_ids=torch.empty(T, k, dtype=torch.int32, device=router_logits.device),
        )
    assert out.weights.shape == (T, k) and out.weights.dtype == torch.float32, out.weights.shape
    assert out.expert_ids.shape == (T, k) and out.expert_ids.dtype == torch.int32, out.expert_ids.shape
    if resolve_backend(backend, router_logits.device) == "triton":
        route_triton(router_logits, k, out, normalize)
    else:
        route_torch(router_logits, k, out, normalize)
    return out


def route_torch(router_logits: torch.Tensor, k: int, out: RouterOutput, normalize: bool = True) -> None:
    """The reference: transformers' top-k routers (Mixtral, Qwen-MoE, OLMoE) after their gate projection."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    top, ids = torch.topk(probs, k, dim=-1)  # [T, K] each, descending
    if normalize:
        top /= top.sum(dim=-1, keepdim=True)
    out.weights.copy_(top)
    out.expert_ids.copy_(ids)


def route_triton(router_logits: torch.Tensor, k: int, out: RouterOutput, normalize: bool = True) -> None:
    T, E = router_logits.shape
    if T == 0:
        return
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    block_e = triton.next_power_of_2(E)
    block_t = tile_rows(block_e, T)
    grid = (triton.cdiv(T, block_t),)
    _route_kernel[grid](
        logits, out.weights, out.expert_ids,
        T, E, k,
        logits.stride(0), out.weights.stride(0), out.expert_ids.stride(0),
        out.weights.stride(1), out.expert_ids.stride(1),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k), NORMALIZE=normalize,
    )  # fmt: skip


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    T, E, K,
    stride_lt, stride_wt, stride_it, stride_wk, stride_ik,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """One program routes BLOCK_T tokens: K rounds of "take the largest logit not yet taken".

    logits_ptr  [T, E] any float dtype (unit stride along E)
    weights_ptr [T, K] float32 out
    ids_ptr     [T, K] int32 out
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE]
    picks = tl.arange(0, BLOCK_K)  # [BK]
    row_ok = rows < T
    x = tl.load(
        logits_ptr + rows[:, None] * stride_lt + cols[None, :],
        mask=row_ok[:, None] & (cols[None, :] < E), other=0.0,
    ).to(tl.float32)  # [BT, BE]  # fmt: skip
    free = (cols[None, :] < E) & (rows[:, None] >= 0)  # [BT, BE] candidates not yet taken
    top = tl.max(tl.where(free, x, float("-inf")), axis=1)  # [BT] the largest logit
    p = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # exp(logit - top) of each pick
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(K):
        m = tl.max(tl.where(free, x, float("-inf")), axis=1)  # [BT]
        hit = free & (x == m[:, None])  # [BT, BE]
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # [BT] lowest id among ties
        free = free & (cols[None, :] != idx[:, None])
        p = tl.where(picks[None, :] == j, tl.exp(m - top)[:, None], p)
        ids = tl.where(picks[None, :] == j, idx[:, None], ids)
    if NORMALIZE:
        w = p / tl.sum(p, axis=1)[:, None]  # [BT, BK] softmax over the k picks
    else:
        valid = (cols[None, :] < E) & (rows[:, None] >= 0)  # [BT, BE]
        total = tl.sum(tl.where(valid, tl.exp(x - top[:, None]), 0.0), axis=1)  # [BT]
        w = p / total[:, None]  # [BT, BK] softmax over all E
    mask = row_ok[:, None] & (picks[None, :] < K)
    tl.store(weights_ptr + rows[:, None] * stride_wt + picks[None, :] * stride_wk, w, mask=mask)
    tl.store(ids_ptr + rows[:, None] * stride_it + picks[None, :] * stride_ik, ids, mask=mask)
