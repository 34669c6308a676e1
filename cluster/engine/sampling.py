"""Sampling parameters and the sampler that turns a row of logits into the next token.

Each request carries its own random generator (seeded when ``seed`` is given),
so a seeded request samples the same tokens alone or inside any batch.

The order, as vLLM's sampler: ``logit_bias`` is added to the raw logits; then the
penalties (``repetition_penalty`` over prompt and generated tokens, the multiplicative
rule of transformers and vLLM; ``frequency_penalty`` and ``presence_penalty`` over the
generated tokens, OpenAI's additive rule); greedy takes the argmax there; otherwise
temperature, then ``min_p``, ``top_k`` and ``top_p``, and a draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeshard.cluster.engine.logprobs import MAX_LOGPROBS


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # report each token's logprob and this many alternatives
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the same for every prompt token

    def __init__(self, max_tokens: int = 16, **kwargs):  # allows SamplingParams(32, temperature=0)
        super().__init__(max_tokens=max_tokens, **kwargs)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "SamplingParams":
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits: no bias and no penalty changes the scores the argmax is taken of."""
        return (
            self.greedy
            and not self.logit_bias
            and self.repetition_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
        )


SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64); a request's seed + choice wraps into it


class SamplingError(ValueError):
    """One sequence's next token could not be sampled (its logits are not finite)."""


def make_generator(params: SamplingParams) -> torch.Generator:
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed % SEED_SPACE)
    else:
        generator.seed()
    return generator


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """logits [V] float64 -> logits [V] with ``logit_bias`` and the penalties applied (a new tensor)."""
    scores = logits.clone()
    vocab = scores.shape[0]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)  # [B]
        scores[ids] += torch.tensor(list(params.logit_bias.values()), dtype=scores.dtype)
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)  # [S]
        values = scores[seen]
        scores[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long), minlength=vocab)[:vocab]  # [V]
        scores -= params.frequency_penalty * counts.double() + params.presence_penalty * (counts > 0).double()
    return scores


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> int:
    """logits [V] -> the next token id; numerically safe for every accepted parameter.

    ``prompt_ids`` and ``output_ids`` (the tokens generated so far) feed the penalties.
    The work is in float64 log space, shifted so the largest score is 0 before
    dividing by the temperature: every value is then in [-inf, 0] with at least
    one 0, so no temperature overflows to NaN and the distribution is never empty.
    A row that is not finite (the model produced NaN or inf) raises ``SamplingError``.
    """
    if not bool(torch.isfinite(logits).all()):
        raise SamplingError("the model produced non-finite logits for this sequence")
    scores = apply_penalties(logits.double(), params, prompt_ids, output_ids)  # [V] float64
    if params.greedy:
        return int(torch.argmax(scores))
    logprobs = processed_logprobs(scores, params)  # [V]
    probs = (logprobs - logprobs.max()).exp()  # [V], max 1: multinomial normalises
    return int(torch.multinomial(probs, 1, generator=generator))


NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # the float dtypes numpy reads (not bfloat16)


@dataclass(frozen=True)
class GreedyRows:
    """Each row's argmax, or None for a row left to ``sample_token`` (which raises its error on one not finite)."""

    token_ids: list[int | None]


def greedy_rows(logits: torch.Tensor) -> GreedyRows:
    """logits [R, V] -> what ``sample_token`` returns for each row under ``plain_greedy`` parameters, in one pass
    over the rows instead of one per row: widening to float64 keeps every value and their order, and both take
    the first of equal maxima. A row whose sum is finite has only finite values; one whose sum is not (a NaN or
    an infinity, or finite values that overflow it) is left to ``sample_token`` (None)."""
    if logits.shape[0] == 0:
        return GreedyRows([])
    if logits.device.type != "cpu":  # one copy back of both, where the logits are
        finite, choices = torch.stack((logits.sum(dim=1).isfinite().long(), logits.max(dim=1).indices)).tolist()
    else:
        finite = logits.sum(dim=1).isfinite().tolist()  # [R]
        choices = first_maxima(logits)  # [R]
    return GreedyRows([choice if ok else None for choice, ok in zip(choices, finite)])


def first_maxima(rows: torch.Tensor) -> list[int]:
    """rows [R, V] -> the index of each row's first maximum (rows of finite values; a NaN's place is not
    defined). On the CPU numpy's argmax reads the row where it knows the dtype: several times faster than
    torch's ``max`` along a row (0.09 against 0.8 ms for 16 rows of 49152 float32 logits, one thread)."""
    if rows.device.type == "cpu" and rows.dtype in NUMPY_FLOATS:
        return rows.numpy().argmax(axis=1).tolist()
    return rows.max(dim=1).indices.tolist()


def processed_logprobs(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """scores [V] float64 (after bias and penalties) -> the log-distribution a token is drawn from: temperature,
    then min_p, top_k and top_p (what they drop is -inf; never all of it)."""
    shifted = scores - scores.max()  # [V], max 0
    scaled = shifted / params.temperature  # [V] in [-inf, 0]; the argmax stays 0
    if params.min_p > 0.0:  # drop tokens below min_p times the top token's probability (the top one's score is 0 here)
        scaled = scaled.masked_fill(scaled < math.log(params.min_p), float("-inf"))
    if 0 < params.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logprobs = scaled.log_softmax(-1)  # [V]
    if params.top_p < 1.0:
        sorted_logprobs, order = torch.sort(logprobs, descending=True)  # [V]
        probs = sorted_logprobs.exp()
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one; 0 for the first
        drop_sorted = before >= params.top_p  # keep the smallest prefix reaching top_p (never empty)
        logprobs = logprobs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logprobs
