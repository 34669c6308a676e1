"""Fair admission: one client may hold at most a share of the server's sequences.

The policy, in order, for a request of ``k`` sequences (prompts x n):

1. the client (its address, or the first value of ``client_header`` when a trusted proxy sets it)
   already holds ``h`` sequences, waiting or running; if ``h + k > max_sequences_per_client`` the
   request is answered 429 with ``Retry-After`` and nothing is queued;
2. otherwise the engine queue decides: beyond ``max_waiting`` queued requests, 503 with ``Retry-After``;
3. admitted sequences wait in arrival order and run at most ``engine.max_running`` at a time.

So a client that floods the server fills its own share and is refused, while the rest of the queue
stays open to everyone else. A sequence's slot is returned when it leaves the engine: finished,
failed, aborted, or cancelled by a disconnect.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from moeshard.deploy.errors import APIError

logger = logging.getLogger(__name__)


def client_id(scope: dict, client_header: str | None) -> str:
    """Who is asking: the trusted header's first value when configured and present, else the peer address."""
    if client_header is not None:
        wanted = client_header.lower().encode()
        for name, value in scope.get("headers", []):
            if name.lower() == wanted:
                return value.decode("latin-1").split(",")[0].strip() or "-"
    client = scope.get("client")
    return client[0] if client else "-"


class ClientAdmission:
    """Sequences held per client; used from the event loop only."""

    def __init__(self, max_per_client: int, retry_after_s: int):
        self.max_per_client = max_per_client
        self.retry_after_s = retry_after_s
        self._held: Counter[str] = Counter()

    def acquire(self, client: str, sequences: int) -> None:
        """Reserve ``sequences`` slots for ``client`` or answer 429; each must be given back with ``releaser``."""
        held = self._held[client]
        if held + sequences > self.max_per_client:
            raise APIError(
                429,
                f"this client already has {held} sequences waiting or running; one client may hold at most "
                f"{self.max_per_client}: retry when some have finished",
                retry_after_s=self.retry_after_s,
            )
        self._held[client] += sequences

    def releaser(self, client: str) -> Callable[[], None]:
        """A callback that returns one of ``client``'s slots (called once per sequence)."""

        def release() -> None:
            self._held[client] -= 1
            if self._held[client] <= 0:
                del self._held[client]

        return release

    def release(self, client: str, sequences: int) -> None:
        """Return slots that were reserved but never submitted."""
        release = self.releaser(client)
        for _ in range(sequences):
            release()

    def held(self) -> int:
        return sum(self._held.values())
