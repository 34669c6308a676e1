"""Run a set of requests through an engine to completion, with text and stop strings at this edge.

Shared by the single-process ``LLM`` and the cluster coordinator, so both
produce the same outputs from the same engine steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from moeshard.cluster.engine.engine import Engine, FinishReason
from moeshard.cluster.engine.logprobs import TokenLogprobs
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.engine.stop_strings import StopStringMatcher
from moeshard.cluster.text.detokenizer import IncrementalDetokenizer
from moeshard.cluster.text.tokenizer import Tokenizer

_batch_ids = itertools.count()


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    text: str = ""
    finish_reason: str | None = None  # "error" when this sequence failed (see ``error``)
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # per generated token, when asked for (``SamplingParams.logprobs``)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (the first None), when asked for


class TextStream:
    """One request's generated text: incremental detokenisation plus stop strings."""

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids) if tokenizer else None
        self.stops = StopStringMatcher(params.stop)
        self._pieces: list[str] = []
        self.stopped = False  # a stop string was found; the text ends right before it

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token_id: int, last: bool) -> str:
        """Add a token; returns the new text to show (never a piece of a stop string)."""
        if self.detokenizer is None or self.stopped:
            return ""
        new_text = self.detokenizer.push(token_id)
        if last:
            new_text += self.detokenizer.finish()
        check = self.stops.feed(new_text, final=last)
        self.stopped = check.stopped
        self._pieces.append(check.emit)
        return check.emit


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text to show
    finish_reason: FinishReason | None  # set when the request is finished


def apply_token(engine: Engine, request_id: str, stream: TextStream, token_id: int, finish: FinishReason | None) -> TextDelta:
    """Push one generated token into its request's text; a stop string found there ends the request and frees its cache."""
    text = stream.push(token_id, last=finish is not None)
    if stream.stopped and finish is None:
        engine.abort(request_id)
        finish = FinishReason.STOP
    return TextDelta(text, finish)


def generate_to_completion(
    engine: Engine, tokenizer: Tokenizer | None, prompts: list[list[int]], params: list[SamplingParams]
) -> list[RequestOutput]:
    """Add every prompt, step the engine until all finish, and return the outputs in prompt order."""
    if len(prompts) != len(params):
        raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    batch = next(_batch_ids)
    outputs: dict[str, RequestOutput] = {}
    streams: dict[str, TextStream] = {}
    try:
        for i, (ids, p) in enumerate(zip(prompts, params)):
            request_id = f"offline-{batch}-{i}"
            engine.add_request(request_id, ids, p)
            outputs[request_id] = RequestOutput(prompt_token_ids=list(ids))
            streams[request_id] = TextStream(tokenizer, list(ids), p)
        while engine.has_work():
            for event in engine.step():
                out, stream = outputs[event.request_id], streams[event.request_id]
                if event.finish_reason is FinishReason.ERROR:
                    out.finish_reason, out.error, out.text = event.finish_reason.value, event.error, stream.text
                    continue
                out.token_ids.append(event.token_id)
                if event.logprobs is not None:
                    out.logprobs = (out.logprobs or []) + [event.logprobs]
                if event.prompt_logprobs is not None:
                    out.prompt_logprobs = event.prompt_logprobs
                delta = apply_token(engine, event.request_id, stream, event.token_id, event.finish_reason)
                if delta.finish_reason is not None:
                    out.finish_reason = delta.finish_reason.value
                    out.text = stream.text
    finally:
        for request_id in outputs:  # an error must not leave requests holding the KV cache
            engine.abort(request_id)
    return list(outputs.values())
