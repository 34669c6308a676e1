"""One-line error messages, written once for the CLI, the HTTP endpoint, the engine and config loading.

Imports neither torch nor Ray (the client-side commands use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """The first error of a pydantic (or FastAPI request) validation, without pydantic's banner."""

    loc: tuple[Any, ...]  # where, e.g. ("cluster", "transport"); FastAPI's leading "body" is dropped
    message: str

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.loc)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.loc else self.message


def first_field_error(exc: Exception) -> FieldError:
    """The first error of an exception with pydantic's ``errors()`` (ValidationError, RequestValidationError)."""
    first = exc.errors()[0]
    loc = tuple(part for part in first.get("loc", ()) if part != "body")
    return FieldError(loc, str(first.get("msg", "invalid value")).removeprefix("Value error, "))


def one_line(exc: BaseException) -> str:
    """A short message for any exception: a validation error's first error, else the first line of its text."""
    if callable(getattr(exc, "errors", None)):
        return str(first_field_error(exc))
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
