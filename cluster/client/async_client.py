"""``AsyncClient``: the asyncio twin of ``moeshard.cluster.client.Client`` (same methods, awaited; httpx2 underneath).

    async with AsyncClient("http://127.0.0.1:8000") as client:
        reply = await client.chat([{"role": "user", "content": "Hi!"}], max_tokens=16)
        async for event in client.stream("Once upon a time", max_tokens=32):
            print(event.text, end="")

Leaving an ``async for`` over a stream early closes its connection (and cancels the request on the server)
when the generator is finalised; wrap it in ``contextlib.aclosing`` to close it at once.

Like ``Client``, it only does the I/O and the sleeping, here awaited; the plans of
``moeshard.cluster.client.core`` decide what to send, when to retry and what the answers mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx2

from moeshard.cluster.client.base import Messages
from moeshard.cluster.client.core import ClientBase, Outcome, Plan, Route, Send
from moeshard.cluster.client.types import (
    ChatCompletion,
    Completion,
    Experts,
    Health,
    Model,
    RebalanceReport,
    ScaleReport,
    StreamEvent,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncClient(ClientBase):
    """An asyncio client for one server; arguments as ``Client``. Use ``async with``, or ``await close()``."""

    _http: httpx2.AsyncClient | None = None  # made on first use, inside the event loop that uses it

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- the API ---------------------------------------------------------------------
    async def models(self) -> list[Model]:
        return await self._run(self._core.models())

    async def health(self) -> Health:
        """The server's health; an unhealthy server (503 with a health report) gives ``Health`` with ``ok`` False."""
        return await self._run(self._core.health())

    async def experts(self) -> Experts:
        return await self._run(self._core.experts())

    async def rebalance(self) -> RebalanceReport:
        """Rebalance the server's experts from the load measured since the last rebalance (needs the API key)."""
        return await self._run(self._core.rebalance())

    async def scale(self, expert_actors: int) -> ScaleReport:
        """Grow or shrink the server's expert pool to ``expert_actors`` while it serves (needs the API key)."""
        return await self._run(self._core.scale(expert_actors))

    async def complete(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Completion:
        return await self._run(self._core.complete(prompt, model, sampling))

    async def chat(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> ChatCompletion:
        return await self._run(self._core.chat(messages, model, sampling))

    def stream(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> AsyncIterator[StreamEvent]:
        """Text deltas as they are generated, then one ``done`` event with ``usage`` and ``finish_reason``."""
        return self._events(self._core.stream(prompt, model, sampling))

    def chat_stream(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> AsyncIterator[StreamEvent]:
        """As ``stream``, for a chat: the assistant's reply as deltas, then the ``done`` event."""
        return self._events(self._core.chat_stream(messages, model, sampling))

    # -- the I/O ---------------------------------------------------------------------
    async def _run(self, plan: Plan[T]) -> T:
        """Carry ``plan`` out: send what it asks, sleep when it backs off; its result."""
        outcome: Outcome = None
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            outcome = await (self._send(step) if isinstance(step, Send) else asyncio.sleep(step.seconds))

    async def _send(self, send: Send) -> httpx2.Response | httpx2.HTTPError:
        """The answer to ``send`` (read and closed unless it stays open), or the error it failed with."""
        if self._http is None:
            self._http = httpx2.AsyncClient(**self._core.http_options())
        try:
            response = await self._http.send(send.request, stream=True)
            if not send.keeps_open(response):
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except httpx2.HTTPError as exc:
            return exc
        return response

    async def _events(self, route: Plan[Route]) -> AsyncIterator[StreamEvent]:
        stream = await self._run(self._core.open_stream(*await self._run(route)))
        try:
            async with contextlib.aclosing(stream.response.aiter_lines()) as lines:
                async for line in lines:
                    for event in stream.feed(line):
                        yield event
        except httpx2.HTTPError as exc:
            raise stream.broken(exc) from None
        finally:
            await stream.response.aclose()  # early or broken: drops the connection, so the server cancels the request
        yield stream.finish()
