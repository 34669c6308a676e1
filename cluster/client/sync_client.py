"""The Python client SDK: ``Client`` talks to a moeshard server (or any OpenAI-compatible one) over HTTP.

    from moeshard.cluster.client import Client

    with Client("http://127.0.0.1:8000", api_key="KEY") as client:
        print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
        for event in client.chat_stream([{"role": "user", "content": "Hi!"}], max_tokens=32):
            print(event.text, end="")          # the last event has done=True, usage and finish_reason

Sampling arguments (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``n``, ``seed``, ``stop``,
``ignore_eos``, ...) go to the server as they are; it validates them (``BadRequest`` on a bad one).
Requests that were never admitted (503) or never reached the server are retried with exponential
backoff; a stream is retried only before it produced anything. Importing this module loads neither
torch nor ray (the async twin is ``moeshard.cluster.client.async_client.AsyncClient``).

``Client`` only does the I/O (httpx2, blocking) and the sleeping: what to send, when to retry and what the
answers mean are the plans of ``moeshard.cluster.client.core``, shared with ``AsyncClient``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
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

__all__ = ["Client"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Client(ClientBase):
    """A synchronous client for one server. ``base_url`` may end in ``/v1`` or not.

    ``model``: the model id to send (default: the first one ``models()`` lists, asked once).
    ``timeout``: seconds to connect and for each read, so a long stream is fine as long as tokens keep coming.
    ``max_retries``: retries after a 503 or a failed connection, waiting ``backoff * 2**attempt`` s (jittered).
    """

    _http: httpx2.Client | None = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------
    def models(self) -> list[Model]:
        return self._run(self._core.models())

    def health(self) -> Health:
        """The server's health; an unhealthy server (503 with a health report) gives ``Health`` with ``ok`` False."""
        return self._run(self._core.health())

    def experts(self) -> Experts:
        return self._run(self._core.experts())

    def rebalance(self) -> RebalanceReport:
        """Rebalance the server's experts from the load measured since the last rebalance (needs the API key)."""
        return self._run(self._core.rebalance())

    def scale(self, expert_actors: int) -> ScaleReport:
        """Grow or shrink the server's expert pool to ``expert_actors`` while it serves (needs the API key)."""
        return self._run(self._core.scale(expert_actors))

    def complete(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Completion:
        return self._run(self._core.complete(prompt, model, sampling))

    def chat(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> ChatCompletion:
        return self._run(self._core.chat(messages, model, sampling))

    def stream(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Iterator[StreamEvent]:
        """Text deltas as they are generated, then one ``done`` event with ``usage`` and ``finish_reason``.

        The request is sent when iteration starts; leaving the loop early closes the connection, which
        cancels the request on the server.
        """
        return self._events(self._run(self._core.stream(prompt, model, sampling)))

    def chat_stream(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> Iterator[StreamEvent]:
        """As ``stream``, for a chat: the assistant's reply as deltas, then the ``done`` event."""
        return self._events(self._run(self._core.chat_stream(messages, model, sampling)))

    # -- the I/O ---------------------------------------------------------------------
    def _run(self, plan: Plan[T]) -> T:
        """Carry ``plan`` out: send what it asks, sleep when it backs off; its result."""
        outcome: Outcome = None
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            outcome = self._send(step) if isinstance(step, Send) else time.sleep(step.seconds)

    def _send(self, send: Send) -> httpx2.Response | httpx2.HTTPError:
        """The answer to ``send`` (read and closed unless it stays open), or the error it failed with."""
        if self._http is None:
            self._http = httpx2.Client(**self._core.http_options())
        try:
            response = self._http.send(send.request, stream=True)
            if not send.keeps_open(response):
                try:
                    response.read()
                finally:
                    response.close()
        except httpx2.HTTPError as exc:
            return exc
        return response

    def _events(self, route: Route) -> Iterator[StreamEvent]:
        stream = self._run(self._core.open_stream(*route))
        try:
            for line in stream.response.iter_lines():
                yield from stream.feed(line)
        except httpx2.HTTPError as exc:
            raise stream.broken(exc) from None
        finally:
            stream.response.close()  # early or broken: drops the connection, so the server cancels the request
        yield stream.finish()
