"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from moeshard.cluster.errors import first_field_error

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    500: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s  # sent as Retry-After (429, 503)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": status}}


def error_headers(retry_after_s: int | None) -> dict[str, str]:
    return {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}


def error_response(status: int, message: str, param: str | None = None, retry_after_s: int | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param), headers=error_headers(retry_after_s))


def error_bytes(status: int, message: str) -> bytes:
    """The body of an error answered below FastAPI (the ASGI edge guard)."""
    return json.dumps(error_body(status, message)).encode()


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the first invalid field; an unparsable body names no field (its location is a character offset)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, f"the request body is not valid JSON: {reason} at character {first['loc'][-1]}")
    error = first_field_error(exc)
    return error_response(400, str(error), error.field or None)
