"""The client SDK's errors: one class per kind of failure, each carrying the HTTP status and the server's message.

The server answers errors as OpenAI does, ``{"error": {"message", "type", "param", "code"}}``;
``error_from_response`` turns such a body (or any other body) into the matching ``APIError`` subclass.
Failures without an HTTP answer (``ConnectionFailed``, ``RequestTimeout``) have ``status`` None.
"""

from __future__ import annotations

import json
import socket

from moeshard.cluster.errors import one_line


class APIError(Exception):
    """A request that failed: ``status`` (None without an HTTP answer), the server's ``message``, its error ``type``."""

    def __init__(self, status: int | None, message: str, type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param

    def __str__(self) -> str:
        return f"{self.status} {self.type or 'error'}: {self.message}" if self.status is not None else self.message


class BadRequest(APIError):
    """400: a bad parameter, or a prompt longer than the model's context."""


class Unauthorized(APIError):
    """401: a missing or wrong API key."""


class NotFound(APIError):
    """404: an unknown model or route."""


class Overloaded(APIError):
    """503: the server's queue is full (the request was not admitted), or it is not ready yet."""


class ServerError(APIError):
    """500 and other 5xx: the server failed the request (for example an expert actor died mid-step)."""


class ConnectionFailed(APIError):
    """No connection to the server, or the connection was lost before the answer was complete."""


class RequestTimeout(APIError):
    """The server did not answer (or stream the next chunk) within the client's timeout."""


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequest, 401: Unauthorized, 404: NotFound, 503: Overloaded}


def error_class(status: int) -> type[APIError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else APIError


def error_from_body(status: int, body: dict) -> APIError:
    """The error for an OpenAI error object (``body`` is the ``{"error": {...}}`` dict)."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = str(error.get("message") or body.get("detail") or f"HTTP {status}")
    return error_class(status)(status, message, error.get("type"), error.get("param"))


def error_from_response(status: int, text: str) -> APIError:
    """The error for an HTTP answer with a non-2xx ``status`` and body ``text`` (JSON or not)."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return error_from_body(status, body)
    first_line = text.strip().splitlines()[0] if text.strip() else f"HTTP {status}"
    return error_class(status)(status, first_line[:500])


def connection_reason(exc: BaseException) -> str:
    """A short reason for a failed connection ("connection refused", ...), found anywhere in the exception's chain."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host not found"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        for nested in (e.__cause__, e.__context__, getattr(e, "os_error", None), getattr(e, "reason", None), *e.args):
            if isinstance(nested, BaseException):
                stack.append(nested)
    return one_line(exc)
