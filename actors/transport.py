"""Dispatch transports: deliver one message to each expert actor with work and collect the replies.

Four implementations behind one interface; ``send`` starts a layer's messages and
``receive`` collects them, so the coordinator can work (a shared expert) meanwhile.
- ``ActorCallTransport``: plain Ray actor calls, one per actor with work.
- ``SocketTransport`` (``socket/transport.py``): one TCP connection per actor,
  a frame per actor with work; Ray only for the control path.
- ``CompiledGraphTransport``: a Ray Compiled Graph over the live expert actors
  (shared-memory channels on one node), compiled once and re-executed every
  MoE layer; every member is called, with an empty message when it has no rows.
- ``CollectiveTransport`` (``collective/transport.py``): tensors over a torch.distributed
  pair per actor (gloo between host tensors, NCCL between GPUs), not bytes.
The socket and collective transports share ``LinkTransport``: a connection of their own to each
actor, opened through Ray. Batches and replies cross as ``ExpertBatch``/``ExpertReply``: the
byte transports encode them (``wire.py``), the collective one sends their tensors.
None raises for a failed actor: an ``Exchange`` carries the replies that came
back and, for each actor that died or did not answer within the dispatch
timeout, why (never a hang). The dispatch decides what to resend and where.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayChannelTimeoutError

from moeshard.actors.wire import NO_WORK, ExpertBatch, ExpertReply
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)


class ExpertActorFailed(RuntimeError):
    """An expert actor died or timed out during dispatch."""


@dataclass(frozen=True)
class ActorRef:
    index: int
    handle: object  # ray.actor.ActorHandle
    description: str  # e.g. "expert actor 2 (layers 0-31, experts 4-5)"


@dataclass(frozen=True)
class Exchange:
    replies: list[ExpertReply | None]  # replies[i] from actor i; None where nothing was sent or the actor failed
    failures: dict[int, BaseException]  # actor -> why no reply came back


class Transport(Protocol):
    # True: batches may hold tensors on the coordinator's device (a GPU's), and replies come back on a device;
    # False: the dispatch plans and packs on the host.
    carries_device_tensors: bool

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> object:
        """Start: messages[i] to actor i (None: nothing to send; always None outside ``live``); a ticket for ``receive``."""
        ...

    def receive(self, ticket: object) -> Exchange:
        """What came back for the ticket's messages (never raises for a failed actor)."""
        ...

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> Exchange:
        """send, then receive."""
        ...

    def abandon(self, ticket: object) -> None:
        """A ticket that will never be received (the pass it belonged to failed): its replies are dropped as
        they arrive instead of being kept for a ``receive`` that will not come."""
        ...

    def close(self) -> None: ...


def failure(actor: ActorRef, cause: BaseException) -> ExpertActorFailed:
    """The error naming ``actor`` and its experts, for a request that cannot be served without it."""
    reason = "did not answer in time" if isinstance(cause, (GetTimeoutError, RayChannelTimeoutError, TimeoutError)) else "died"
    return ExpertActorFailed(f"{actor.description} {reason}: {type(cause).__name__}: {one_line(cause)}")


@dataclass(frozen=True)
class _Sent:
    """One layer's messages in flight."""

    num_actors: int
    deadline: float  # time.monotonic() by which every reply must be in
    refs: object = None  # {actor: ObjectRef} (actor calls) or the graph's list of refs, one per member
    members: tuple[int, ...] = ()  # a compiled graph's actors, in its output order
    sent: frozenset[int] = frozenset()  # actors that were sent rows (a compiled graph calls every member)
    error: BaseException | None = None  # the graph failed to compile or to start


class ActorCallTransport:
    carries_device_tensors = False

    def __init__(self, actors: list[ActorRef], timeout_s: float):
        self.actors = actors
        self.timeout_s = timeout_s

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> Exchange:
        return self.receive(self.send(messages, live))

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> _Sent:
        refs = {i: self.actors[i].handle.run_experts.remote(m.encode()) for i, m in enumerate(messages) if m is not None}
        return _Sent(len(messages), time.monotonic() + self.timeout_s, refs=refs)

    def receive(self, ticket: _Sent) -> Exchange:
        replies: list[ExpertReply | None] = [None] * ticket.num_actors
        failures: dict[int, BaseException] = {}
        for i, ref in ticket.refs.items():
            try:
                replies[i] = ExpertReply.decode(ray.get(ref, timeout=max(0.0, ticket.deadline - time.monotonic())))
            except (RayActorError, GetTimeoutError) as exc:
                failures[i] = exc
        return Exchange(replies, failures)

    def abandon(self, ticket: _Sent) -> None:
        pass  # the ticket's object refs are dropped with it, and Ray frees what they hold

    def close(self) -> None:
        pass


class Link(Protocol):
    """A connection of a ``LinkTransport`` to one expert actor."""

    handle: object  # the actor it was opened to (a restarted actor at the same index is another handle)
    error: BaseException | None  # set once it is unusable

    def forget(self, posted: object) -> None:
        """The reply to what ``_post`` returned as ``posted`` will not be taken: drop it now or as it arrives."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _LinkSent:
    num_actors: int
    deadline: float  # time.monotonic() by which every reply must be in
    posted: dict[int, tuple[Link, object]] = field(default_factory=dict)  # actor -> (link, what ``_take`` needs)
    failures: dict[int, BaseException] = field(default_factory=dict)  # actors that could not be sent to


class LinkTransport:
    """A connection of its own to each expert actor, opened through Ray on first use (and again after a failure, or
    for a new actor at the same index), that carries every layer's batch and reply. A link that fails or times out
    is dropped, so a late reply is never read; the dispatch marks the actor down.

    Subclasses open links (``_open``, through a control-group call to the actor, with ``secret``), post a batch on one
    (``_post``) and take its reply (``_take``, raising ``ConnectionError`` or ``TimeoutError`` for a failed actor)."""

    carries_device_tensors = False
    open_errors: tuple[type[BaseException], ...] = (RayActorError, GetTimeoutError, OSError)  # an actor that cannot be reached

    def __init__(self, actors: list[ActorRef], timeout_s: float, secret_bytes: int):
        self.actors = actors  # shared with the dispatch, which resizes it in place when the pool scales
        self.timeout_s = timeout_s
        self.secret = secrets.token_bytes(secret_bytes)
        self.node_ip = ray.util.get_node_ip_address()
        self._links: dict[int, Link] = {}

    def _open(self, actor: int, handle: object, deadline: float) -> Link:
        raise NotImplementedError

    def _post(self, link: Link, batch: ExpertBatch) -> object:
        raise NotImplementedError

    def _take(self, link: Link, posted: object, deadline: float) -> ExpertReply:
        raise NotImplementedError

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> Exchange:
        return self.receive(self.send(messages, live))

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> _LinkSent:
        sent = _LinkSent(len(messages), time.monotonic() + self.timeout_s)
        for actor, batch in enumerate(messages):
            if batch is None:
                continue
            try:
                link = self._link(actor, sent.deadline)
                sent.posted[actor] = (link, self._post(link, batch))
            except self.open_errors as exc:
                self._drop(actor)
                sent.failures[actor] = exc
        return sent

    def receive(self, ticket: _LinkSent) -> Exchange:
        replies: list[ExpertReply | None] = [None] * ticket.num_actors
        failures = dict(ticket.failures)
        for actor, (link, posted) in ticket.posted.items():
            try:
                replies[actor] = self._take(link, posted, ticket.deadline)
            except (ConnectionError, TimeoutError) as exc:
                self._drop(actor, link)
                failures[actor] = exc
        return Exchange(replies, failures)

    def abandon(self, ticket: _LinkSent) -> None:
        for link, posted in ticket.posted.values():
            link.forget(posted)

    def _link(self, actor: int, deadline: float) -> Link:
        """The open link to ``actor``, or a new one."""
        handle = self.actors[actor].handle
        link = self._links.get(actor)
        if link is not None and link.handle is handle and link.error is None:
            return link
        self._drop(actor)
        link = self._links[actor] = self._open(actor, handle, deadline)
        return link

    def _drop(self, actor: int, link: Link | None = None) -> None:
        current = self._links.get(actor)
        if current is not None and (link is None or current is link):
            del self._links[actor]
            current.close()

    def close(self) -> None:
        for actor in list(self._links):
            self._drop(actor)


_GRAPH_ERRORS = (RayActorError, RayChannelError, RayChannelTimeoutError, GetTimeoutError)


class CompiledGraphTransport:
    """A compiled graph over the live expert actors; torn down on a failure, recompiled when the live set changes."""

    carries_device_tensors = False

    def __init__(self, actors: list[ActorRef], timeout_s: float):
        self.actors = actors
        self.timeout_s = timeout_s
        self._graph = None
        self._members: tuple[int, ...] = ()  # the actors in the compiled graph, in its output order

    def _compile(self, members: tuple[int, ...]):
        from ray.dag import InputNode, MultiOutputNode

        # Wait until every member is alive (a restarted actor reloads its experts first).
        ray.get([self.actors[a].handle.ready.remote() for a in members], timeout=self.timeout_s)
        with InputNode() as inputs:
            graph = MultiOutputNode([self.actors[a].handle.run_experts.bind(inputs[pos]) for pos, a in enumerate(members)])
        return graph.experimental_compile(_submit_timeout=self.timeout_s)

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> Exchange:
        return self.receive(self.send(messages, live))

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> _Sent:
        members = tuple(sorted(live))
        sent = frozenset(i for i, m in enumerate(messages) if m is not None)
        deadline = time.monotonic() + self.timeout_s
        try:
            if self._graph is None or self._members != members:
                self._teardown()  # the live set changed: recompile over the actors that are up
                self._graph, self._members = self._compile(members), members
            refs = self._graph.execute(*[messages[a].encode() if messages[a] is not None else NO_WORK for a in members])
        except _GRAPH_ERRORS as exc:  # an actor killed while the graph compiles or starts fails here
            return _Sent(len(messages), deadline, members=members, sent=sent, error=exc)
        return _Sent(len(messages), deadline, refs=refs, members=members, sent=sent)

    def receive(self, ticket: _Sent) -> Exchange:
        error = ticket.error
        if error is None:
            try:
                answers = ray.get(ticket.refs, timeout=max(0.0, ticket.deadline - time.monotonic()))
            except _GRAPH_ERRORS as exc:
                error = exc
        if error is not None:  # every reply of this execution is lost with the graph
            self._teardown()  # first: an actor still inside the graph's loop cannot answer a ping
            failed = self._failed_members(error, ticket.members) or sorted(ticket.sent)
            return Exchange([None] * ticket.num_actors, {a: error for a in failed})
        replies: list[ExpertReply | None] = [None] * ticket.num_actors
        for pos, a in enumerate(ticket.members):
            replies[a] = ExpertReply.decode(answers[pos]) if a in ticket.sent else None
        return Exchange(replies, {})

    def abandon(self, ticket: _Sent) -> None:
        pass  # a compiled graph's refs dropped unread have their execution's results deleted by Ray

    def _failed_members(self, exc: BaseException, members: tuple[int, ...]) -> list[int]:
        """The members named in ``exc`` or not answering a ping (a dead one fails at once, a restarting one times out)."""
        actor_id = getattr(exc, "actor_id", None) if isinstance(exc, RayActorError) else None
        named = [a for a in members if actor_id is not None and self.actors[a].handle._actor_id.hex() == actor_id]
        pings = {a: self.actors[a].handle.ready.remote() for a in members if a not in named}
        silent = []
        for a, ref in pings.items():
            try:
                ray.get(ref, timeout=1.0)
            except (RayActorError, GetTimeoutError):
                silent.append(a)
        return named + silent

    def _teardown(self) -> None:
        graph, self._graph, self._members = self._graph, None, ()
        if graph is not None:
            try:
                graph.teardown(kill_actors=False)
            except Exception as exc:  # a broken graph may fail to tear down; it is dropped either way
                logger.warning("compiled graph teardown: %s", exc)

    def close(self) -> None:
        self._teardown()
