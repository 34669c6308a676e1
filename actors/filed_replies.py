"""Replies that arrived on a link before anyone asked for them, filed by key until taken or forgotten.

A link with two dispatches in flight (ping-pong micro-batches) reads replies in the order they come and files
each under its key (a sequence number or a tag) for the ``wait`` that will take it. A pass that fails abandons
the other dispatch it had in flight: its replies are dropped, now if filed, otherwise as they arrive, so that
nothing is kept for a ``wait`` that will not come.

Not thread-safe on its own: each link calls it under the lock that guards its reads.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Reply = TypeVar("Reply")


class FiledReplies(Generic[Reply]):
    def __init__(self) -> None:
        self._filed: dict[int, Reply] = {}  # key -> reply read but not yet taken
        self._forgotten: set[int] = set()  # keys whose replies no one will take: dropped as they arrive

    def file(self, key: int, reply: Reply) -> bool:
        """Keep ``reply`` for its ``take``; False (and dropped) if its key was forgotten."""
        if key in self._forgotten:
            self._forgotten.discard(key)
            return False
        self._filed[key] = reply
        return True

    def take(self, key: int) -> Reply:
        """The reply filed under ``key`` (KeyError if it is not here)."""
        return self._filed.pop(key)

    def forget(self, key: int) -> None:
        """No one will take the reply to ``key``: dropped if filed, else when it is filed."""
        if self._filed.pop(key, None) is None:
            self._forgotten.add(key)

    def __contains__(self, key: int) -> bool:
        return key in self._filed

    @property
    def filed(self) -> frozenset[int]:
        return frozenset(self._filed)

    @property
    def forgotten(self) -> frozenset[int]:
        return frozenset(self._forgotten)
