"""The serving engine: the step loop on its own thread, requests as async streams of text deltas.

Requests are admitted into a bounded queue (``Overloaded`` beyond it), joined
to the running batch between steps (continuous batching) and streamed back as
``StreamDelta``s. Cancelling a stream (a client disconnect) aborts its request
and frees its KV cache. A failed step (an expert actor died) fails only the
requests in that step's batch; a sequence whose token cannot be sampled fails
alone; the loop keeps serving. Each request's ``on_done`` callback runs (on
its event loop) exactly once, when it leaves the engine for any reason.

The loop thread owns the ``Engine``; other threads talk to it through a
thread-safe inbox, and it answers through each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from moeshard.cluster.engine.engine import Engine, FinishReason, TokenEvent
from moeshard.cluster.engine.generation import TextStream, apply_token
from moeshard.cluster.engine.logprobs import TokenLogprobs
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.errors import one_line
from moeshard.cluster.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The waiting queue is full; the request was not admitted."""


class RequestFailed(RuntimeError):
    """The engine failed while running this request, or the request ran past its deadline."""


class EngineStopped(RuntimeError):
    """The engine loop is not running; nothing is admitted."""


ANSWER_GRACE_S = 5.0  # a stream waits this long past its request's deadline for the loop's own verdict


@dataclass(frozen=True)
class StreamDelta:
    token_ids: list[int]  # new generated ids
    text: str  # new text
    finish_reason: str | None  # set on the last delta
    num_prompt_tokens: int
    num_generated_tokens: int
    logprobs: list[TokenLogprobs] | None = None  # one per id in token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first delta, when the request asked for them


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    deadline: float  # time.monotonic() by which the request must finish
    on_done: Callable[[], None] | None = None
    num_generated: int = 0


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_used_blocks: int
    kv_total_blocks: int
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0  # of those, found already computed


class RequestHandle:
    """One submitted request: iterate ``stream()`` for its deltas; ``abort()`` (or leaving the stream early) frees it."""

    def __init__(self, engine: "AsyncEngine", request: _Request):
        self._engine = engine
        self._request = request
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_ids)

    async def stream(self) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while True:
                wait_s = self._request.deadline - time.monotonic() + ANSWER_GRACE_S
                try:
                    item = await asyncio.wait_for(self._request.out.get(), timeout=max(wait_s, 0.0))
                except asyncio.TimeoutError:
                    raise RequestFailed("no answer from the engine before the request's deadline") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # cancelled (client gone), failed, or abandoned: free the request's cache now
                self.abort()

    def abort(self) -> None:
        self._engine._send(("abort", self.request_id))


class AsyncEngine:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, max_waiting: int = 256, request_timeout_s: float = 600.0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.request_timeout_s = request_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}  # owned by the loop thread
        self._pending = 0  # submitted but not yet taken by the loop thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._stats = EngineStats(0, 0, 0, engine.cache.num_blocks)
        self._thread = threading.Thread(target=self._run, name="moeshard-engine", daemon=True)
        self._thread.start()

    # -- called from the event loop -------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        detokenize_with_prompt: bool = True,
        on_done: Callable[[], None] | None = None,
    ) -> "RequestHandle":
        """Admit a request (ValueError for a bad one, Overloaded when the queue is full, EngineStopped when the loop
        has died); stream it from the handle.

        ``on_done`` is called on this event loop once the request has left the engine (finished, failed or aborted).
        """
        if not self.is_running:
            raise EngineStopped("the engine loop has stopped; this server is being replaced")
        self.engine.check_prompt(prompt_ids, params.max_tokens)
        self.engine.check_params(params)
        with self._lock:
            if self._stats.waiting + self._pending >= self.max_waiting:
                raise Overloaded(f"the server is overloaded: {self.max_waiting} requests are already waiting")
            self._pending += 1
        request = _Request(
            request_id=f"req-{next(self._ids)}",
            prompt_ids=list(prompt_ids),
            params=params,
            text=TextStream(self.tokenizer, list(prompt_ids) if detokenize_with_prompt else [], params),
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            deadline=time.monotonic() + self.request_timeout_s,
            on_done=on_done,
        )
        self._send(("add", request))
        return RequestHandle(self, request)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the loop thread ------------------------------------------------------------
    def _send(self, message) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the loop must never die quietly: every request hears of it
            logger.exception("the engine loop stopped")
            failure = RuntimeError(f"the engine loop stopped: {one_line(exc)}")
            while True:  # requests still in the inbox are answered too
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._put(payload, RequestFailed(one_line(failure)))
                    self._done(payload)
            self._fail_all(failure)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain_inbox()
            self._expire()
            self._refresh_stats()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep serving
                logger.error("engine step failed: %s", exc)
                self._fail_all(exc)
                continue
            for event in events:
                request = self._requests.get(event.request_id)
                if request is None:
                    continue
                if event.finish_reason is FinishReason.ERROR:
                    self._fail_one(request, event.error or "sampling failed")
                else:
                    self._deliver(request, event)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(payload.request_id, payload.prompt_ids, payload.params)
                except Exception as exc:  # noqa: BLE001 - reported to the request
                    self._put(payload, RequestFailed(one_line(exc)))
                    self._done(payload)
                    continue
                self._requests[payload.request_id] = payload
            elif kind == "abort":
                request = self._requests.pop(payload, None)
                if request is not None:
                    self.engine.abort(payload)
                    self._done(request)

    def _deliver(self, request: _Request, event: TokenEvent) -> None:
        request.num_generated += 1
        delta = apply_token(self.engine, request.request_id, request.text, event.token_id, event.finish_reason)
        if delta.finish_reason is not None:
            self._requests.pop(request.request_id, None)
            self._done(request)
        self._put(
            request,
            StreamDelta(
                token_ids=[event.token_id],
                text=delta.text,
                finish_reason=delta.finish_reason.value if delta.finish_reason is not None else None,
                num_prompt_tokens=len(request.prompt_ids),
                num_generated_tokens=request.num_generated,
                logprobs=None if event.logprobs is None else [event.logprobs],
                prompt_logprobs=event.prompt_logprobs,
            ),
        )

    def _expire(self) -> None:
        """Fail the requests past their deadline (their cache is freed)."""
        now = time.monotonic()
        for request in list(self._requests.values()):
            if now > request.deadline:
                self._fail_one(request, f"the request did not finish within {self.request_timeout_s:.0f}s")

    def _fail_all(self, exc: Exception) -> None:
        for request in list(self._requests.values()):
            self._fail_one(request, one_line(exc))

    def _fail_one(self, request: _Request, message: str) -> None:
        self._requests.pop(request.request_id, None)
        try:
            self.engine.abort(request.request_id)
        except Exception as abort_error:  # noqa: BLE001 - the request is answered either way
            logger.error("abort of %s failed: %s", request.request_id, one_line(abort_error))
        self._put(request, RequestFailed(message))
        self._done(request)

    def _done(self, request: _Request) -> None:
        if request.on_done is not None:
            callback, request.on_done = request.on_done, None
            self._call(request, callback)

    def _put(self, request: _Request, item) -> None:
        self._call(request, request.out.put_nowait, item)

    @staticmethod
    def _call(request: _Request, fn, *args) -> None:
        try:
            request.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            pass

    def _refresh_stats(self) -> None:
        usage = self.engine.cache.usage()
        self._stats = EngineStats(
            waiting=len(self.engine.waiting),
            running=len(self.engine.running),
            kv_used_blocks=usage.used_blocks,
            kv_total_blocks=usage.total_blocks,
            prefix_query_tokens=usage.prefix_query_tokens,
            prefix_hit_tokens=usage.prefix_hit_tokens,
        )
