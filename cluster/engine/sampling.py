"""Sampling parameters and the sampler that turns a row of logits into the next token.

Each request carries its own random generator (seeded when ``seed`` is given),
so a seeded request samples the same tokens alone or inside any batch.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [V] -> the next token id; numerically safe for every temperature, top_k and top_p.

    The work is in float64 log space, shifted so the largest logit is 0 before
    dividing by the temperature: every value is then in [-inf, 0] with at least
    one 0, so no temperature overflows to NaN and the distribution is never empty.
    A row that is not finite (the model produced NaN or inf) raises ``SamplingError``.
    """
    if not bool(torch.isfinite(logits).all()):
        raise SamplingError("the model produced non-finite logits for this sequence")
    if params.greedy:
        return int(torch.argmax(logits))
    shifted = logits.double() - logits.max().double()  # [V], max 0
    scaled = shifted / params.temperature  # [V] in [-inf, 0]; the argmax stays 0
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
    probs = (logprobs - logprobs.max()).exp()  # [V], max 1: multinomial normalises
    return int(torch.multinomial(probs, 1, generator=generator))
