"""A load generator for a serving endpoint: synthetic prompts, closed-loop concurrency or Poisson arrivals.

Each request streams a completion with ``ignore_eos`` so that it generates exactly ``output_len`` tokens, and
records its time to first token (TTFT: request sent -> first text delta) and time per output token
(TPOT: the rest of its latency over its remaining tokens, as vLLM's benchmark does). ``run_load`` returns
a ``LoadReport``: throughput, TTFT and TPOT percentiles, and every request's record.

Two workloads model what chat traffic resends: ``shared_prefix_len`` starts every prompt with the same text
(a system prompt), and ``turns`` > 1 makes each request a conversation through the chat route, every turn
resending the earlier turns and answers with a new user message; TTFT is then also reported per turn.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel, Field

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.client.errors import APIError
from moeshard.cluster.client.types import StreamEvent

# Common short English words: about one token each for SentencePiece and byte-level BPE vocabularies alike.
_WORDS = (
    "the of and to in is was for on are with as at be by this from have or one had not but what all were when we "
    "there can an your which their said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know get through"
).split()


class LoadSpec(BaseModel):
    """What to send. ``concurrency`` caps requests in flight (default: 1 without a rate, no cap with one);
    ``request_rate`` (requests/s) makes arrivals a Poisson process instead of a closed loop."""

    requests: int = Field(default=32, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    request_rate: float | None = Field(default=None, gt=0)
    prompt_len: int = Field(default=32, ge=1)
    output_len: int = Field(default=32, ge=1)
    shared_prefix_len: int = Field(default=0, ge=0)  # tokens of one text every prompt starts with, about
    turns: int = Field(default=1, ge=1)  # > 1: each request is a chat of this many turns (one record per turn)
    seed: int = 0

    @property
    def max_in_flight(self) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return self.requests if self.request_rate is not None else 1


class RequestRecord(BaseModel):
    ok: bool
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None  # None with fewer than 2 output tokens
    latency_s: float = 0.0
    turn: int = 0  # which turn of its conversation
    text: str = ""  # the generated text


class LoadReport(BaseModel):
    spec: LoadSpec
    duration_s: float
    completed: int
    failed: int
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens per second
    mean_prompt_tokens: float
    mean_output_tokens: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    first_error: str | None = None
    turn_ttft_p50_s: list[float | None] = Field(default_factory=list)  # per turn, with ``spec.turns`` > 1
    records: list[RequestRecord]


def synthetic_prompt(rng: random.Random, length: int) -> str:
    """About ``length`` tokens of words (a BOS token counts as one)."""
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, length - 1)))


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def stream_one(client: AsyncClient, model: str | None, prompt: str, spec: LoadSpec) -> RequestRecord:
    events = client.stream(prompt, model=model, max_tokens=spec.output_len, temperature=0, ignore_eos=True)
    return await _measure(events)


async def _measure(events: AsyncIterator[StreamEvent], turn: int = 0) -> RequestRecord:
    sent = time.perf_counter()
    first = usage = None
    text: list[str] = []
    try:
        async for event in events:
            if event.text and first is None:
                first = time.perf_counter()
            text.append(event.text)
            if event.done:
                usage = event.usage
    except APIError as exc:
        return RequestRecord(ok=False, error=str(exc), latency_s=time.perf_counter() - sent, turn=turn)
    latency = time.perf_counter() - sent
    outputs = usage.completion_tokens if usage else 0
    ttft = (first if first is not None else time.perf_counter()) - sent
    tpot = (latency - ttft) / (outputs - 1) if outputs > 1 else None
    return RequestRecord(
        ok=True,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        output_tokens=outputs,
        ttft_s=ttft,
        tpot_s=tpot,
        latency_s=latency,
        turn=turn,
        text="".join(text),
    )


async def converse(
    client: AsyncClient, model: str | None, system: str, users: list[str], spec: LoadSpec
) -> list[RequestRecord]:
    """One conversation: each user message is a turn that resends the turns and answers before it; stops at a failure."""
    messages = [{"role": "system", "content": system}] if system else []
    records = []
    for turn, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        events = client.chat_stream(messages, model=model, max_tokens=spec.output_len, temperature=0, ignore_eos=True)
        record = await _measure(events, turn)
        records.append(record)
        if not record.ok:
            break
        messages.append({"role": "assistant", "content": record.text})
    return records


async def run_load(
    client: AsyncClient, spec: LoadSpec, model: str | None = None, on_done: Callable[[RequestRecord], None] | None = None
) -> LoadReport:
    """Send ``spec.requests`` requests for ``model`` (default: the client's) and measure them; failures are recorded, not raised."""
    rng = random.Random(spec.seed)
    prefix = synthetic_prompt(rng, spec.shared_prefix_len + 1) + " " if spec.shared_prefix_len else ""
    if spec.turns > 1:
        prompts = [[synthetic_prompt(rng, spec.prompt_len) for _ in range(spec.turns)] for _ in range(spec.requests)]
    else:
        prompts = [prefix + synthetic_prompt(rng, spec.prompt_len) for _ in range(spec.requests)]
    arrivals = [0.0] * spec.requests
    if spec.request_rate is not None:
        t = 0.0
        for i in range(spec.requests):
            arrivals[i] = t
            t += rng.expovariate(spec.request_rate)
    gate = asyncio.Semaphore(spec.max_in_flight)
    start = time.perf_counter()

    async def scheduled(prompt: str | list[str], at: float) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with gate:
            if isinstance(prompt, list):
                records = await converse(client, model, prefix.strip(), prompt, spec)
            else:
                records = [await stream_one(client, model, prompt, spec)]
        if on_done is not None:
            on_done(records[-1])
        return records

    conversations = await asyncio.gather(*(scheduled(p, a) for p, a in zip(prompts, arrivals)))
    return summarize(spec, [r for records in conversations for r in records], time.perf_counter() - start)


def summarize(spec: LoadSpec, records: list[RequestRecord], duration_s: float) -> LoadReport:
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    failed = [r for r in records if not r.ok]
    return LoadReport(
        spec=spec,
        duration_s=duration_s,
        completed=len(ok),
        failed=len(failed),
        request_throughput=len(ok) / duration_s,
        output_throughput=sum(r.output_tokens for r in ok) / duration_s,
        mean_prompt_tokens=sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
        mean_output_tokens=sum(r.output_tokens for r in ok) / len(ok) if ok else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
        first_error=failed[0].error if failed else None,
        turn_ttft_p50_s=[percentile([r.ttft_s for r in ok if r.turn == t], 50) for t in range(spec.turns)] if spec.turns > 1 else [],
        records=records,
    )
