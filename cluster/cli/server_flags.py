"""What the commands that talk to a running server share: the server flags and one-line exits on client errors."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

from moeshard.cluster.client.base import DEFAULT_TIMEOUT_S
from moeshard.cluster.client.errors import APIError
from moeshard.cluster.errors import first_field_error

API_KEY_ENV = "MOESHARD_API_KEY"
_FLAGS = {"base_url": "--url", "timeout_s": "--timeout"}  # settings fields whose flag is named otherwise


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"the server's API key (default: ${API_KEY_ENV})")
    parser.add_argument("--model", default=None, help="model id to request (default: the first the server lists)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait to connect and for each read")


def fail(message: str) -> None:
    """Exit as argparse does on a usage error: ``moeshard: error: ...`` on stderr, status 2."""
    print(f"moeshard: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def exits_on_client_error(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Wrap a command so that a client error or a bad setting ends it with one line
    (``moeshard: error: cannot reach URL: connection refused``, ``moeshard: error: --requests: ...``)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> None:
        try:
            command(args)
        except APIError as exc:
            fail(str(exc))
        except ValidationError as exc:
            error = first_field_error(exc)
            field = str(error.loc[0]) if error.loc else ""
            fail(f"{_FLAGS.get(field, '--' + field.replace('_', '-'))}: {error.message}" if field else error.message)

    return run
