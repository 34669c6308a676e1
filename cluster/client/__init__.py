"""The Python client SDK: ``Client`` and ``AsyncClient`` for a moeshard server (or any OpenAI-compatible one).

Importing it loads neither torch nor Ray.
"""

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.client.errors import (
    APIError,
    BadRequest,
    ConnectionFailed,
    NotFound,
    Overloaded,
    RequestTimeout,
    ServerError,
    Unauthorized,
)
from moeshard.cluster.client.sync_client import Client

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "NotFound",
    "Overloaded",
    "RequestTimeout",
    "ServerError",
    "Unauthorized",
]
