"""Dispatch transports: deliver one message to each expert actor with work and collect the replies.

Two implementations behind one interface:
- ``ActorCallTransport``: plain Ray actor calls, one per actor with work.
- ``CompiledGraphTransport``: a Ray Compiled Graph over all expert actors
  (shared-memory channels on one node), compiled once and re-executed every
  MoE layer; every actor is called, with an empty message when it has no rows.
Either raises ``ExpertActorFailed`` naming the actor and its experts when an
actor dies or does not answer within the dispatch timeout: never a hang.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayChannelTimeoutError

from moeshard.actors.wire import NO_WORK
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)


class ExpertActorFailed(RuntimeError):
    """An expert actor died or timed out during dispatch."""


@dataclass(frozen=True)
class ActorRef:
    index: int
    handle: object  # ray.actor.ActorHandle
    description: str  # e.g. "expert actor 2 (layers 0-31, experts 4-5)"


class Transport(Protocol):
    def send(self, messages: list[bytes | None]) -> object:
        """Start: messages[i] to actor i (None: nothing to send); returns a ticket for ``receive``."""
        ...

    def receive(self, ticket: object) -> list[bytes | None]:
        """Wait for the replies of ``send``: replies[i] (None where nothing was sent)."""
        ...

    def exchange(self, messages: list[bytes | None]) -> list[bytes | None]:
        """send then receive."""
        ...

    def close(self) -> None: ...


def _failure(actor: ActorRef, cause: BaseException) -> ExpertActorFailed:
    reason = "did not answer in time" if isinstance(cause, (GetTimeoutError, RayChannelTimeoutError)) else "died"
    return ExpertActorFailed(f"{actor.description} {reason}: {type(cause).__name__}: {one_line(cause)}")


@dataclass(frozen=True)
class _Sent:
    """One layer's messages in flight."""

    refs: object  # {actor: ObjectRef} (actor calls) or the graph's list of refs
    num_actors: int
    deadline: float  # time.monotonic() by which every reply must be in
    sent: tuple[int, ...] | list[int] = ()  # actors that were sent rows (compiled graphs call every actor)


class ActorCallTransport:
    def __init__(self, actors: list[ActorRef], timeout_s: float):
        self.actors = actors
        self.timeout_s = timeout_s

    def exchange(self, messages: list[bytes | None]) -> list[bytes | None]:
        return self.receive(self.send(messages))

    def send(self, messages: list[bytes | None]) -> "_Sent":
        refs = {i: self.actors[i].handle.run_experts.remote(m) for i, m in enumerate(messages) if m is not None}
        return _Sent(refs, len(messages), time.monotonic() + self.timeout_s)

    def receive(self, ticket: "_Sent") -> list[bytes | None]:
        refs, deadline = ticket.refs, ticket.deadline
        replies: list[bytes | None] = [None] * ticket.num_actors
        for i, ref in refs.items():
            try:
                replies[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (RayActorError, GetTimeoutError) as exc:
                raise _failure(self.actors[i], exc) from None
        return replies

    def close(self) -> None:
        pass


class CompiledGraphTransport:
    """A compiled graph over every expert actor; rebuilt after an actor failure once the actor is back."""

    def __init__(self, actors: list[ActorRef], timeout_s: float):
        self.actors = actors
        self.timeout_s = timeout_s
        self._graph = None

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        # Wait until every actor is alive (a restarted actor reloads its experts first).
        ray.get([a.handle.ready.remote() for a in self.actors], timeout=self.timeout_s)
        with InputNode() as inputs:
            graph = MultiOutputNode([a.handle.run_experts.bind(inputs[a.index]) for a in self.actors])
        return graph.experimental_compile(_submit_timeout=self.timeout_s)

    def exchange(self, messages: list[bytes | None]) -> list[bytes | None]:
        return self.receive(self.send(messages))

    def send(self, messages: list[bytes | None]) -> "_Sent":
        try:
            if self._graph is None:
                self._graph = self._compile()  # an actor killed while the graph compiles fails here
            refs = self._graph.execute(*[m if m is not None else NO_WORK for m in messages])
        except (RayActorError, RayChannelError, RayChannelTimeoutError, GetTimeoutError) as exc:
            raise self._failed(exc) from None
        sent = [i for i, m in enumerate(messages) if m is not None]
        return _Sent(refs, len(messages), time.monotonic() + self.timeout_s, sent)

    def receive(self, ticket: "_Sent") -> list[bytes | None]:
        try:
            replies = ray.get(ticket.refs, timeout=max(0.0, ticket.deadline - time.monotonic()))
        except (RayActorError, RayChannelError, RayChannelTimeoutError, GetTimeoutError) as exc:
            raise self._failed(exc) from None
        return [reply if i in ticket.sent else None for i, reply in enumerate(replies)]

    def _failed(self, exc: BaseException) -> ExpertActorFailed:
        """Tear the graph down and name the actor that failed."""
        self._teardown()  # first: an actor still inside the graph's loop cannot answer a ping
        failed = self._actor_named_in(exc) or self._find_dead_actor()
        if failed is None:
            return ExpertActorFailed(f"compiled-graph dispatch failed: {type(exc).__name__}: {exc}")
        return _failure(failed, exc)

    def _actor_named_in(self, exc: BaseException) -> ActorRef | None:
        actor_id = getattr(exc, "actor_id", None) if isinstance(exc, RayActorError) else None
        for actor in self.actors:
            if actor_id is not None and actor.handle._actor_id.hex() == actor_id:
                return actor
        return None

    def _find_dead_actor(self) -> ActorRef | None:
        """The first actor that does not answer a ping (a dead one fails at once, a restarting one times out)."""
        for actor in self.actors:
            try:
                ray.get(actor.handle.ready.remote(), timeout=1.0)
            except (RayActorError, GetTimeoutError):
                return actor
        return None

    def _teardown(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            try:
                graph.teardown(kill_actors=False)
            except Exception as exc:  # a broken graph may fail to tear down; it is dropped either way
                logger.warning("compiled graph teardown: %s", exc)

    def close(self) -> None:
        self._teardown()
