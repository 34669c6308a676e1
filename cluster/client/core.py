"""The clients' core, without I/O: what request to send, when to retry, and what an answer or a stream line means.

Every API call is a *plan*: a generator that yields ``Send`` (send this request; the driver sends back the
``httpx2.Response``, or the ``httpx2.HTTPError`` it failed with) and ``Sleep`` (back off before a retry), and
returns the call's result. ``Client`` carries plans out with blocking I/O and ``time.sleep``, ``AsyncClient``
with ``await``; the routes, the retry loop, the error mapping and the stream decoding are all here, once.

A stream is opened by a plan (so it is retried only before it produced anything) and comes back as an
``EventStream``: the open response, whose lines the driver reads and feeds to it.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2

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
    ConnectionFailed,
    NotFound,
    RequestTimeout,
    connection_reason,
    error_from_response,
)
from moeshard.cluster.client.types import ChatCompletion, Completion, Experts, Health, Model, RebalanceReport, ScaleReport

logger = logging.getLogger(__name__)

T = TypeVar("T")
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
REBALANCE = "/v1/experts/rebalance"
SCALE = "/v1/experts/scale"


@dataclass(frozen=True)
class Send:
    """Send ``request``. The driver reads the answer's body and closes it, except for an accepted ``stream``."""

    request: httpx2.Request
    stream: bool = False

    def keeps_open(self, response: httpx2.Response) -> bool:
        return self.stream and response.status_code < 400


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` before the next attempt."""

    seconds: float


Outcome = httpx2.Response | httpx2.HTTPError | None  # what the driver sends back: a Send's answer or failure; None after a Sleep
Plan = Generator[Send | Sleep, Outcome, T]
Route = tuple[str, dict[str, Any]]  # a streamed call's route and body


def transport_error(settings: ClientSettings, exc: httpx2.HTTPError, route: str, mid_stream: bool = False) -> APIError:
    """The ``APIError`` for a request that failed without an HTTP answer (or lost it midway)."""
    if not isinstance(exc, httpx2.TransportError):  # a body that cannot be decoded, too many redirects
        return APIError(None, f"bad answer from {settings.url(route)}: {exc}")
    if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
        return RequestTimeout(None, f"{settings.url(route)} sent nothing for {settings.timeout_s:g} s")
    reason = "connection timed out" if isinstance(exc, httpx2.ConnectTimeout) else connection_reason(exc)
    if mid_stream:
        return ConnectionFailed(None, f"lost the connection to {settings.base_url} mid-stream: {reason}")
    return ConnectionFailed(None, f"cannot reach {settings.base_url}: {reason}")


class EventStream(StreamDecoder):
    """An open stream: ``response``, whose lines the driver reads, ``feed``s here and closes at the end.

    ``broken(exc)`` is the error to raise when reading fails; ``finish()`` gives the last event.
    """

    def __init__(self, response: httpx2.Response, settings: ClientSettings, route: str) -> None:
        super().__init__()
        self.response = response
        self._settings = settings
        self._route = route

    def broken(self, exc: httpx2.HTTPError) -> APIError:
        return transport_error(self._settings, exc, self._route, mid_stream=True)


class ClientCore:
    """The API of ``Client`` and ``AsyncClient`` as plans, for one server; remembers the default model once asked."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._model = settings.model

    def http_options(self) -> dict[str, Any]:
        """The arguments of ``httpx2.Client`` and ``httpx2.AsyncClient``: ``timeout_s`` to connect and for each read,
        no cap on parallel connections (the caller decides), redirects followed."""
        unlimited = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
        return {"timeout": httpx2.Timeout(self.settings.timeout_s), "limits": unlimited, "follow_redirects": True}

    # -- the API, as plans -----------------------------------------------------------
    def models(self) -> Plan[list[Model]]:
        return parse_models((yield from self._call("GET", "/v1/models")).text)

    def health(self) -> Plan[Health]:
        response = yield from self._call("GET", "/health", answers=frozenset({503}))
        return parse_health(response.status_code, response.text)

    def experts(self) -> Plan[Experts]:
        return parse(Experts, (yield from self._call("GET", "/v1/experts")).text, "/v1/experts")

    def rebalance(self) -> Plan[RebalanceReport]:
        return parse(RebalanceReport, (yield from self._call("POST", REBALANCE, {})).text, REBALANCE)

    def scale(self, expert_actors: int) -> Plan[ScaleReport]:
        return parse(ScaleReport, (yield from self._call("POST", SCALE, {"expert_actors": expert_actors})).text, SCALE)

    def complete(self, prompt: str | list[int], model: str | None, sampling: dict[str, Any]) -> Plan[Completion]:
        body = completion_body((yield from self.model_for(model)), prompt, sampling, stream=False)
        return parse(Completion, (yield from self._call("POST", COMPLETIONS, body)).text, COMPLETIONS)

    def chat(self, messages: Messages, model: str | None, sampling: dict[str, Any]) -> Plan[ChatCompletion]:
        body = chat_body((yield from self.model_for(model)), messages, sampling, stream=False)
        return parse(ChatCompletion, (yield from self._call("POST", CHAT_COMPLETIONS, body)).text, CHAT_COMPLETIONS)

    def stream(self, prompt: str | list[int], model: str | None, sampling: dict[str, Any]) -> Plan[Route]:
        """The route and body of a streamed completion, for ``open_stream`` (asks for the model first if need be)."""
        return COMPLETIONS, completion_body((yield from self.model_for(model)), prompt, sampling, stream=True)

    def chat_stream(self, messages: Messages, model: str | None, sampling: dict[str, Any]) -> Plan[Route]:
        return CHAT_COMPLETIONS, chat_body((yield from self.model_for(model)), messages, sampling, stream=True)

    def open_stream(self, route: str, body: dict[str, Any]) -> Plan[EventStream]:
        """Send a streamed call, retried as the policy allows: nothing has come out of it yet."""
        response = yield from self._call("POST", route, body, stream=True)
        return EventStream(response, self.settings, route)

    def model_for(self, model: str | None) -> Plan[str]:
        """``model``, or the client's, or the first one the server lists (asked once)."""
        if model is not None:
            return model
        if self._model is None:
            listed = yield from self.models()
            if not listed:
                raise NotFound(None, f"{self.settings.base_url} serves no model")
            self._model = listed[0].id
        return self._model

    # -- one call --------------------------------------------------------------------
    def _call(
        self, method: str, route: str, body: dict | None = None, answers: frozenset[int] = frozenset(), stream: bool = False
    ) -> Plan[httpx2.Response]:
        """One call, retried as the policy allows; statuses in ``answers`` are returned instead of raised."""
        retry = self.settings.retry
        attempt = 0
        while True:
            request = httpx2.Request(method, self.settings.url(route), json=body, headers=self.settings.headers())
            outcome = yield Send(request, stream)
            try:
                return self._answer(outcome, route, answers)
            except APIError as exc:
                if not retry.should_retry(exc, attempt):
                    raise
                delay = retry.delay(attempt)
                attempt += 1
                logger.info("%s %s: %s; retry %d of %d in %.2f s", method, route, exc, attempt, retry.max_retries, delay)
            yield Sleep(delay)

    def _answer(self, outcome: Outcome, route: str, answers: frozenset[int]) -> httpx2.Response:
        if isinstance(outcome, httpx2.HTTPError):
            raise transport_error(self.settings, outcome, route)
        assert isinstance(outcome, httpx2.Response), f"a Send is answered with a response or an error, not {outcome!r}"
        if outcome.status_code >= 400 and outcome.status_code not in answers:
            raise error_from_response(outcome.status_code, outcome.text)
        return outcome


class ClientBase:
    """What ``Client`` and ``AsyncClient`` share: their arguments (see ``Client``), ``settings`` and the core."""

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
        self._core = ClientCore(self.settings)
