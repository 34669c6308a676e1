"""The edge guard: an ASGI middleware that runs before FastAPI reads or parses a request's body.

    1. auth   with an API key set, every route answers 401 unless the request carries
              ``Authorization: Bearer <key>`` (compared in constant time), except the bare
              liveness probe ``/health``; ``/docs``, ``/redoc``, ``/openapi.json`` and ``/metrics``
              are behind the key unless ``public_docs`` / ``public_metrics`` open them
    2. body   a declared ``Content-Length`` over ``max_body_bytes`` is answered 413 at once; a body
              sent without one is counted as it is read and cut off with 413 past the limit

The settings come from the serving replica (``configure_edge``), one replica per process.
"""

from __future__ import annotations

import hmac
import logging

from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from moeshard.deploy.errors import error_bytes

logger = logging.getLogger(__name__)

LIVENESS_PATH = "/health"
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
METRICS_PATH = "/metrics"


class EdgeSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    api_key: str | None = None
    public_docs: bool = False
    public_metrics: bool = False
    max_body_bytes: int = 4 * 2**20


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes")


_settings = EdgeSettings()


def configure_edge(settings: EdgeSettings) -> None:
    """Set the guard's settings (the serving replica does, when it starts)."""
    global _settings
    _settings = settings


def is_authorized(headers: list[tuple[bytes, bytes]], api_key: str | None) -> bool:
    """True without a key, else when the first Authorization header is exactly ``Bearer <key>`` (constant time)."""
    if api_key is None:
        return True
    sent = next((value for name, value in headers if name.lower() == b"authorization"), b"")
    return hmac.compare_digest(sent, f"Bearer {api_key}".encode())


def route_path(scope: dict) -> str:
    """The path inside the application (without the route prefix Serve mounts it under)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def needs_key(path: str, settings: EdgeSettings) -> bool:
    if path == LIVENESS_PATH:
        return False
    if path in DOC_PATHS:
        return not settings.public_docs
    if path == METRICS_PATH:
        return not settings.public_metrics
    return True


class EdgeGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = _settings
        authorized = is_authorized(scope.get("headers", []), settings.api_key)
        scope["state"] = {**scope.get("state", {}), "authorized": authorized}  # per request, never shared
        if not authorized and needs_key(route_path(scope), settings):
            await _answer(send, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'", {"www-authenticate": "Bearer"})
            return
        declared = _content_length(scope)
        if declared is not None and declared > settings.max_body_bytes:
            await _answer(send, 413, str(BodyTooLarge(settings.max_body_bytes).detail))
            return
        await self._guarded(scope, receive, send, settings.max_body_bytes)

    async def _guarded(self, scope, receive, send, limit: int) -> None:
        """Run the app, counting body bytes as they are read; 413 (if nothing was sent yet) past ``limit``."""
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:
            if not started:
                await _answer(send, 413, str(exc.detail))


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _answer(send, status: int, message: str, extra_headers: dict[str, str] | None = None) -> None:
    body = error_bytes(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
