"""What one request may ask of the server, checked at the edge before any work is queued.

    body         at most ``max_body_bytes`` (413 before the body is parsed)
    text         at most ``max_prompt_chars`` characters over all prompts or messages, before tokenizing
    work         choices (prompts x n) x max_tokens at most ``max_request_tokens``
    per client   at most ``max_sequences_per_client`` sequences waiting or running (429 beyond it)

The server-wide caps (``max_waiting`` queued, ``engine.max_running`` running) answer 503.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from moeshard.deploy.errors import APIError

MAX_CHOICES = 64  # prompts x n in one request


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    max_prompt_chars: int = Field(default=400_000, ge=1)
    max_request_tokens: int = Field(default=262_144, ge=1)  # choices x max_tokens
    max_sequences_per_client: int = Field(default=64, ge=1)
    retry_after_s: int = Field(default=1, ge=1)  # the Retry-After of a 429 or 503


def check_prompt_chars(texts: list[str], limits: Limits, field: str) -> None:
    """400 when the prompt text is longer than ``max_prompt_chars`` (checked before tokenizing)."""
    total = sum(len(t) for t in texts)
    if total > limits.max_prompt_chars:
        raise APIError(400, f"the prompt has {total} characters; this server accepts at most {limits.max_prompt_chars}", field)


def check_choices(choices: int) -> None:
    """400 when a request asks for more sequences (prompts x n) than one request may (checked before tokenizing)."""
    if choices > MAX_CHOICES:
        raise APIError(400, f"the request asks for {choices} sequences (prompts x n); at most {MAX_CHOICES} are allowed", "n")


def check_work(choices: int, max_tokens: int, limits: Limits) -> None:
    """400 when a request asks for more sequences, or more output tokens in all, than one request may."""
    check_choices(choices)
    if choices * max_tokens > limits.max_request_tokens:
        raise APIError(
            400,
            f"the request asks for {choices} x {max_tokens} = {choices * max_tokens} output tokens (prompts x n x "
            f"max_tokens); this server allows at most {limits.max_request_tokens} per request: lower n or max_tokens",
            "max_tokens",
        )
