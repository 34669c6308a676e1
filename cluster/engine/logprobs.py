"""Log-probabilities of tokens under the model's raw logits (before bias, penalties and temperature).

``T`` prompt tokens, ``V`` vocabulary, ``K`` alternatives reported per position.
The engine reports these as ids and floats; text lives at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per position (OpenAI's bound)


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # log-softmax of the raw logits at this token
    top: list[tuple[int, float]]  # the K most likely (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """logits [V] -> the chosen token's logprob and the ``k`` most likely alternatives."""
    assert logits.dim() == 1, f"expected logits [V], got {tuple(logits.shape)}"
    logprobs = logits.double().log_softmax(-1)  # [V]
    return TokenLogprobs(token_id, float(logprobs[token_id]), _top(logprobs, k))


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprobs | None]:
    """logits [T, V] of a prefill over ``token_ids`` -> per prompt token its logprob given the tokens before it.

    The first token has no context, so its entry is None (OpenAI's ``echo`` reports null there).
    """
    assert logits.dim() == 2 and logits.shape[0] == len(token_ids), f"logits {tuple(logits.shape)} for {len(token_ids)} ids"
    out: list[TokenLogprobs | None] = [None]
    for pos in range(1, len(token_ids)):
        out.append(token_logprobs(logits[pos - 1], token_ids[pos], k))  # row pos-1 predicts token pos
    return out


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[0]))  # [K], [K]
    return [(int(i), float(v)) for i, v in zip(ids, values)]
