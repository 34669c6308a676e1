"""What the sync and async clients share: settings, request bodies, the retry policy and the SSE stream decoder.

No I/O here: the plans of ``moeshard.cluster.client.core`` send the bodies built here, retry as
``RetryPolicy`` says, and feed the lines of a streamed answer to a ``StreamDecoder``; ``Client`` and
``AsyncClient`` carry those plans out over httpx2.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeshard.cluster.client.errors import APIError, ConnectionFailed, Overloaded, error_from_body, error_from_response
from moeshard.cluster.client.types import ChatLogprobs, CompletionLogprobs, Health, Model, StreamEvent, Usage

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 2
_RESERVED = frozenset({"prompt", "messages", "stream", "stream_options"})

Messages = Sequence[Mapping[str, Any] | BaseModel]  # {"role": ..., "content": ...} dicts (or pydantic models of them)
T = TypeVar("T", bound=BaseModel)


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter: attempt ``a`` (0-based) waits ``backoff_s * 2**a`` (at most ``max_backoff_s``),
    scaled by a random factor in [0.5, 1]. Only 503 and connection failures are retried."""

    model_config = ConfigDict(frozen=True)

    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=8.0, ge=0)

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def should_retry(self, error: APIError, attempt: int) -> bool:
        return attempt < self.max_retries and isinstance(error, (Overloaded, ConnectionFailed))


class ClientSettings(BaseModel):
    """A client's settings, validated once. ``timeout_s`` bounds connecting and each read (each stream chunk)."""

    model_config = ConfigDict(frozen=True)

    base_url: str
    api_key: str | None = None
    model: str | None = None
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    retry: RetryPolicy = RetryPolicy()

    @field_validator("base_url")
    @classmethod
    def _normalize(cls, url: str) -> str:
        """``http://host:port``, ``http://host:port/`` and ``http://host:port/v1`` name the same server."""
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
        return url.removesuffix("/v1")

    @classmethod
    def from_arguments(
        cls, base_url: str, api_key: str | None, model: str | None, timeout: float, max_retries: int, backoff: float
    ) -> "ClientSettings":
        """The settings behind ``Client(...)`` and ``AsyncClient(...)``, whose arguments are the same."""
        retry = RetryPolicy(max_retries=max_retries, backoff_s=backoff)
        return cls(base_url=base_url, api_key=api_key, model=model, timeout_s=timeout, retry=retry)

    def url(self, route: str) -> str:
        return f"{self.base_url}{route}"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def _sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    reserved = _RESERVED.intersection(sampling)
    if reserved:
        raise TypeError(f"{sorted(reserved)[0]!r} is set by the client method, not a sampling argument")
    return {k: v for k, v in sampling.items() if v is not None}


def completion_body(model: str, prompt: str | list[int], sampling: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, **_sampling(sampling)}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def chat_body(model: str, messages: Messages, sampling: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    plain = [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else dict(m) for m in messages]
    body: dict[str, Any] = {"model": model, "messages": plain, **_sampling(sampling)}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def parse(model_cls: type[T], text: str, route: str) -> T:
    """A 2xx body as ``model_cls``; an ``APIError`` naming the route if it is not what the server should send."""
    try:
        return model_cls.model_validate_json(text)
    except ValidationError as exc:
        raise APIError(None, f"unexpected answer from {route}: {str(exc).splitlines()[0]}") from None


class _ModelList(BaseModel):
    data: list[Model]


def parse_models(text: str) -> list[Model]:
    return parse(_ModelList, text, "/v1/models").data


def parse_health(status: int, text: str) -> Health:
    """``/health`` answers 503 with a health report when unhealthy; any other 503 body (a proxy's) is an error."""
    if status == 503:
        try:
            return Health.model_validate_json(text)
        except ValidationError:
            raise error_from_response(503, text) from None
    return parse(Health, text, "/health")


def _delta_logprobs(choice: dict) -> CompletionLogprobs | ChatLogprobs | None:
    """A streamed choice's logprobs, in the shape of its route (completion chunks carry ``text``)."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    return CompletionLogprobs(**logprobs) if "text" in choice else ChatLogprobs(**logprobs)


class StreamDecoder:
    """Turns the lines of a server-sent-events answer into ``StreamEvent``s; ``finish()`` gives the last one.

    Handles both completion chunks (``choices[i].text``) and chat chunks (``choices[i].delta.content``);
    an error event in the stream raises the matching ``APIError``.
    """

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reasons: dict[int, str] = {}
        self.done = False

    def feed(self, line: str) -> list[StreamEvent]:
        line = line.strip()
        if not line.startswith("data:"):
            return []  # blank separators, comments, other SSE fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise APIError(None, f"malformed stream event: {data[:200]!r}") from None
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise error_from_body(int(error.get("code") or 500), chunk)
        if chunk.get("usage"):
            self.usage = Usage(**chunk["usage"])
        events = []
        for choice in chunk.get("choices", []):
            text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content") or ""
            finish = choice.get("finish_reason")
            if finish is not None:
                self.finish_reasons[choice["index"]] = finish
            logprobs = _delta_logprobs(choice)
            if text or finish is not None or logprobs is not None:
                events.append(StreamEvent(text=text, index=choice["index"], finish_reason=finish, logprobs=logprobs))
        return events

    def finish(self) -> StreamEvent:
        if not self.done:
            raise ConnectionFailed(None, "the stream ended before the server finished it")
        return StreamEvent(done=True, usage=self.usage, finish_reason=self.finish_reasons.get(0))
