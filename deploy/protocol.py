"""The OpenAI-compatible schemas: requests validated at the edge (and mapped to ``SamplingParams``), response envelopes.

Every field is bounded here: integers within 64 bits (and their own ranges), finite floats, stop strings
by count and length, messages by count. What depends on the model (token ids against the vocabulary,
``max_tokens`` against the context) is checked when a request is admitted; text length and total work
per request in ``limits``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from moeshard.cluster.engine.generation_defaults import GenerationDefaults
from moeshard.cluster.engine.logprobs import MAX_LOGPROBS
from moeshard.cluster.engine.prompts import as_prompt_list
from moeshard.cluster.engine.sampling import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16
MAX_EXPERT_ACTORS = 1024  # in one scaling request
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_MODEL_NAME_CHARS = 256
MAX_LOGIT_BIAS = 1024  # token ids in one logit_bias map


def _neutral(value: Any, neutral: tuple) -> bool:
    return value is None or any(value == n for n in neutral)


# OpenAI request fields this server does not implement, with the values that ask for nothing:
# any other value is refused with a 400 naming the field (never silently ignored).
UNSUPPORTED_COMMON = {"best_of": (1,), "suffix": ("",), "metadata": ({},), "store": (False,), "service_tier": ("auto", "default")}
UNSUPPORTED_CHAT = {
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # meaningless without tools, which are refused
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields are ignored as OpenAI-compatible servers do; fields we cannot honour are refused below.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    # None: the model's generation_config.json default, else OpenAI's (temperature 1, top_p 1, no top_k/min_p).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    ignore_eos: bool = False
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(default=None, max_length=MAX_MODEL_NAME_CHARS)  # accepted; identifies nobody here
    best_of: Any = None
    suffix: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    @field_validator("best_of", "suffix", "metadata", "store", "service_tier")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if not _neutral(value, UNSUPPORTED_COMMON[info.field_name]):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1, got 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) > INT64_MAX:
                raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return value

    def sampling_params(
        self, default_max_tokens: int, choice: int = 0, defaults: GenerationDefaults = GenerationDefaults(), room: int | None = None
    ) -> SamplingParams:
        """The engine's parameters for choice ``choice``: the request's fields, else the model's defaults.

        ``room``: tokens left in the context after the prompt; a default ``max_tokens`` never asks for more.
        """
        given = self.model_dump(
            include={"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"},
            exclude_none=True,
        )
        return SamplingParams(
            max_tokens=self.max_tokens or min(defaults.max_new_tokens or default_max_tokens, room or INT64_MAX),
            **{**defaults.sampling_fields(), **given},
            seed=None if self.seed is None else self.seed + choice,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=self.token_logprobs(),
        )

    def token_logprobs(self) -> int | None:
        """How many alternatives to report with each generated token's logprob; None: no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0, le=INT64_MAX)  # 0: with echo, the prompt alone (scoring)
    echo: bool = False  # the prompt's text (and with logprobs, its tokens' logprobs) before the completion
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _nothing_to_return(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo, to score the prompt alone)")
        return self

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt (and its logprobs) without a completion."""
        return self.max_tokens == 0

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def echo_texts(self, prompt_ids: list[list[int]], decode: Callable[[list[int]], str] | None) -> list[str]:
        """Per prompt, the text ``echo`` puts before its completions: the prompt as given, or its ids decoded."""
        if not self.echo:
            return [""] * len(prompt_ids)
        return [p if isinstance(p, str) else decode(ids) if decode else "" for p, ids in zip(self.prompts(), prompt_ids)]

    def sampling_params(
        self, default_max_tokens: int, choice: int = 0, defaults: GenerationDefaults = GenerationDefaults(), room: int | None = None
    ) -> SamplingParams:
        params = super().sampling_params(default_max_tokens, choice, defaults, room)
        if self.echo and self.logprobs is not None:
            params = params.model_copy(update={"prompt_logprobs": self.logprobs})
        if self.echo_only:  # the engine always samples: one token, which the route drops
            params = params.model_copy(update={"max_tokens": 1})
        return params

    def texts(self) -> list[str]:
        """The prompt's text parts (what tokenizing will read)."""
        return [p for p in as_prompt_list(self.prompt) if isinstance(p, str)]

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        prompts = as_prompt_list(self.prompt)
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @field_validator(*UNSUPPORTED_CHAT)
    @classmethod
    def _unsupported_chat(cls, value: Any, info: ValidationInfo) -> Any:
        if not _neutral(value, UNSUPPORTED_CHAT[info.field_name]):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(
        self, default_max_tokens: int, choice: int = 0, defaults: GenerationDefaults = GenerationDefaults(), room: int | None = None
    ) -> SamplingParams:
        params = super().sampling_params(default_max_tokens, choice, defaults, room)
        if self.max_completion_tokens is not None and self.max_tokens is None:
            params = params.model_copy(update={"max_tokens": self.max_completion_tokens})
        return params

    def texts(self) -> list[str]:
        """The messages' text (what templating and tokenizing will read)."""
        return [m.text() for m in self.messages]

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class ScaleRequest(BaseModel):
    """``POST /v1/experts/scale``: the number of expert actors the pool should have."""

    model_config = ConfigDict(extra="forbid")

    expert_actors: int = Field(ge=1, le=MAX_EXPERT_ACTORS)


def envelope(request_id: str, kind: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    """The fields every completion response and stream chunk carries."""
    out = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
