"""``AsyncClient``: the asyncio twin of ``moeshard.cluster.client.Client`` (same methods, awaited; aiohttp underneath).

    async with AsyncClient("http://127.0.0.1:8000") as client:
        reply = await client.chat([{"role": "user", "content": "Hi!"}], max_tokens=16)
        async for event in client.stream("Once upon a time", max_tokens=32):
            print(event.text, end="")

Leaving an ``async for`` over a stream early closes its connection (and cancels the request on the server)
when the generator is finalised; wrap it in ``contextlib.aclosing`` to close it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from moeshard.cluster.client.base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    ClientSettings,
    Messages,
    StreamDecoder,
    chat_body,
    completion_body,
    parse,
    parse_health,
    parse_models,
)
from moeshard.cluster.client.errors import APIError, ConnectionFailed, NotFound, RequestTimeout, connection_reason, error_from_response
from moeshard.cluster.client.types import ChatCompletion, Completion, Experts, Health, Model, StreamEvent

logger = logging.getLogger(__name__)


class AsyncClient:
    """An asyncio client for one server; arguments as ``Client``. Use ``async with``, or ``await close()``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
    ):
        self.settings = ClientSettings.from_arguments(base_url, api_key, model, timeout, max_retries, backoff)
        self._session: aiohttp.ClientSession | None = None
        self._model = self.settings.model

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- the API ---------------------------------------------------------------------
    async def models(self) -> list[Model]:
        return parse_models((await self._answer("GET", "/v1/models"))[1])

    async def health(self) -> Health:
        """The server's health; an unhealthy server (503 with a health report) gives ``Health`` with ``ok`` False."""
        return parse_health(*await self._answer("GET", "/health", answers={503}))

    async def experts(self) -> Experts:
        return parse(Experts, (await self._answer("GET", "/v1/experts"))[1], "/v1/experts")

    async def complete(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Completion:
        body = completion_body(await self._model_for(model), prompt, sampling, stream=False)
        return parse(Completion, (await self._answer("POST", "/v1/completions", body))[1], "/v1/completions")

    async def chat(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> ChatCompletion:
        body = chat_body(await self._model_for(model), messages, sampling, stream=False)
        return parse(ChatCompletion, (await self._answer("POST", "/v1/chat/completions", body))[1], "/v1/chat/completions")

    async def stream(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> AsyncIterator[StreamEvent]:
        """Text deltas as they are generated, then one ``done`` event with ``usage`` and ``finish_reason``."""
        body = completion_body(await self._model_for(model), prompt, sampling, stream=True)
        async for event in self._events("/v1/completions", body):
            yield event

    async def chat_stream(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> AsyncIterator[StreamEvent]:
        """As ``stream``, for a chat: the assistant's reply as deltas, then the ``done`` event."""
        body = chat_body(await self._model_for(model), messages, sampling, stream=True)
        async for event in self._events("/v1/chat/completions", body):
            yield event

    # -- plumbing --------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            t = self.settings.timeout_s
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                connector=aiohttp.TCPConnector(limit=0),  # no cap on parallel connections: the caller decides
            )
        return self._session

    async def _model_for(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._model is None:
            listed = await self.models()
            if not listed:
                raise NotFound(None, f"{self.settings.base_url} serves no model")
            self._model = listed[0].id
        return self._model

    async def _answer(self, method: str, route: str, body: dict | None = None, answers=frozenset()) -> tuple[int, str]:
        """The status and body of a (non-streamed) call."""
        response = await self._request(method, route, body, answers)
        try:
            return response.status, await response.text(encoding="utf-8")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._transport_error(exc, route, mid_stream=True) from None
        finally:
            response.release()

    async def _events(self, route: str, body: dict) -> AsyncIterator[StreamEvent]:
        response = await self._request("POST", route, body)
        decoder = StreamDecoder()
        try:
            async for line in response.content:
                for event in decoder.feed(line.decode("utf-8")):
                    yield event
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._transport_error(exc, route, mid_stream=True) from None
        finally:
            if decoder.done:
                response.release()
            else:
                response.close()  # abandoned or broken: drop the connection so the server cancels the request
        yield decoder.finish()

    async def _request(self, method: str, route: str, body: dict | None = None, answers=frozenset()) -> aiohttp.ClientResponse:
        """One call, retried as the policy allows; statuses in ``answers`` are returned instead of raised."""
        retry = self.settings.retry
        attempt = 0
        while True:
            try:
                return await self._send(method, route, body, answers)
            except APIError as exc:
                if not retry.should_retry(exc, attempt):
                    raise
                delay = retry.delay(attempt)
                attempt += 1
                logger.info("%s %s: %s; retry %d of %d in %.2f s", method, route, exc, attempt, retry.max_retries, delay)
                await asyncio.sleep(delay)

    async def _send(self, method: str, route: str, body: dict | None, answers) -> aiohttp.ClientResponse:
        try:
            response = await self._http().request(method, self.settings.url(route), json=body, headers=self.settings.headers())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._transport_error(exc, route) from None
        if response.status >= 400 and response.status not in answers:
            try:
                text = await response.text(encoding="utf-8", errors="replace")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                text = ""
            finally:
                response.release()
            raise error_from_response(response.status, text)
        return response

    def _transport_error(self, exc: BaseException, route: str, mid_stream: bool = False) -> APIError:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            reason = "connection timed out"
        elif isinstance(exc, asyncio.TimeoutError):
            return RequestTimeout(None, f"{self.settings.url(route)} sent nothing for {self.settings.timeout_s:g} s")
        else:
            reason = connection_reason(exc)
        if mid_stream:
            return ConnectionFailed(None, f"lost the connection to {self.settings.base_url} mid-stream: {reason}")
        return ConnectionFailed(None, f"cannot reach {self.settings.base_url}: {reason}")
