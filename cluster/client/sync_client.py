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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import requests

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
from moeshard.cluster.client.errors import (
    APIError,
    BadRequest,
    ConnectionFailed,
    NotFound,
    Overloaded,
    RequestTimeout,
    ServerError,
    Unauthorized,
    connection_reason,
    error_from_response,
)
from moeshard.cluster.client.types import ChatCompletion, Completion, Experts, Health, Model, StreamEvent

__all__ = [
    "Client",
    "AsyncClient",
    "APIError",
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "Overloaded",
    "ServerError",
    "ConnectionFailed",
    "RequestTimeout",
    "Completion",
    "ChatCompletion",
    "StreamEvent",
    "Model",
    "Health",
    "Experts",
]

logger = logging.getLogger(__name__)


class Client:
    """A synchronous client for one server. ``base_url`` may end in ``/v1`` or not.

    ``model``: the model id to send (default: the first one ``models()`` lists, asked once).
    ``timeout``: seconds to connect and for each read, so a long stream is fine as long as tokens keep coming.
    ``max_retries``: retries after a 503 or a failed connection, waiting ``backoff * 2**attempt`` s (jittered).
    """

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
        self._session = requests.Session()
        self._model = self.settings.model

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------
    def models(self) -> list[Model]:
        return parse_models(self._request("GET", "/v1/models").text)

    def health(self) -> Health:
        """The server's health; an unhealthy server (503 with a health report) gives ``Health`` with ``ok`` False."""
        response = self._request("GET", "/health", answers={503})
        return parse_health(response.status_code, response.text)

    def experts(self) -> Experts:
        return parse(Experts, self._request("GET", "/v1/experts").text, "/v1/experts")

    def complete(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Completion:
        body = completion_body(self._model_for(model), prompt, sampling, stream=False)
        return parse(Completion, self._request("POST", "/v1/completions", body).text, "/v1/completions")

    def chat(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> ChatCompletion:
        body = chat_body(self._model_for(model), messages, sampling, stream=False)
        return parse(ChatCompletion, self._request("POST", "/v1/chat/completions", body).text, "/v1/chat/completions")

    def stream(self, prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> Iterator[StreamEvent]:
        """Text deltas as they are generated, then one ``done`` event with ``usage`` and ``finish_reason``.

        The request is sent when iteration starts; leaving the loop early closes the connection, which
        cancels the request on the server.
        """
        body = completion_body(self._model_for(model), prompt, sampling, stream=True)
        return self._events("/v1/completions", body)

    def chat_stream(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> Iterator[StreamEvent]:
        """As ``stream``, for a chat: the assistant's reply as deltas, then the ``done`` event."""
        body = chat_body(self._model_for(model), messages, sampling, stream=True)
        return self._events("/v1/chat/completions", body)

    # -- plumbing --------------------------------------------------------------------
    def _model_for(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._model is None:
            listed = self.models()
            if not listed:
                raise NotFound(None, f"{self.settings.base_url} serves no model")
            self._model = listed[0].id
        return self._model

    def _events(self, route: str, body: dict) -> Iterator[StreamEvent]:
        response = self._request("POST", route, body, stream=True)
        decoder = StreamDecoder()
        with response:
            try:
                for line in response.iter_lines():
                    yield from decoder.feed(line.decode("utf-8"))
            except requests.RequestException as exc:
                raise self._transport_error(exc, route, mid_stream=True) from None
        yield decoder.finish()

    def _request(self, method: str, route: str, body: dict | None = None, stream: bool = False, answers=frozenset()) -> requests.Response:
        """One call, retried as the policy allows; statuses in ``answers`` are returned instead of raised."""
        retry = self.settings.retry
        attempt = 0
        while True:
            try:
                return self._send(method, route, body, stream, answers)
            except APIError as exc:
                if not retry.should_retry(exc, attempt):
                    raise
                delay = retry.delay(attempt)
                attempt += 1
                logger.info("%s %s: %s; retry %d of %d in %.2f s", method, route, exc, attempt, retry.max_retries, delay)
                time.sleep(delay)

    def _send(self, method: str, route: str, body: dict | None, stream: bool, answers) -> requests.Response:
        timeout = self.settings.timeout_s
        try:
            response = self._session.request(
                method, self.settings.url(route), json=body, headers=self.settings.headers(), timeout=(timeout, timeout), stream=stream
            )
        except requests.RequestException as exc:
            raise self._transport_error(exc, route) from None
        if response.status_code >= 400 and response.status_code not in answers:
            with response:
                raise error_from_response(response.status_code, response.text)
        return response

    def _transport_error(self, exc: requests.RequestException, route: str, mid_stream: bool = False) -> APIError:
        timed_out = isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower()
        if timed_out and not isinstance(exc, requests.ConnectTimeout):
            return RequestTimeout(None, f"{self.settings.url(route)} sent nothing for {self.settings.timeout_s:g} s")
        reason = "connection timed out" if isinstance(exc, requests.ConnectTimeout) else connection_reason(exc)
        if mid_stream:
            return ConnectionFailed(None, f"lost the connection to {self.settings.base_url} mid-stream: {reason}")
        return ConnectionFailed(None, f"cannot reach {self.settings.base_url}: {reason}")
