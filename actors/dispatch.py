"""The coordinator's experts function: all-to-all dispatch of one MoE layer over the expert actors.

    1. route       (done by the model: weights, expert ids [T, K])
    2. plan        expert ids -> destination actor per choice (a replicated expert's tokens split over
                   its replicas by the placement's shares, in token order),
                   a token sent to an actor once even when several of its experts live there
    3. dispatch    permute rows by destination actor (the same kernel that groups by expert)
                   -> one message per actor with work: its rows, their local expert ids and weights
    4. experts     each actor runs its experts and returns its weighted partial sums, in float32
                   (``submit`` returns here: the coordinator runs the shared expert meanwhile)
    5. combine     sum each token's partials (weight 1 per actor it was sent to), rounded once to
                   the model's dtype, as the single process rounds its sum

One message per actor with work per layer, however many of its experts the
layer's tokens chose (E = 128, K = 8 sends no more messages than E = 8, K = 2).

This is the same computation as ``LocalExperts``; only the summation order of
a token's experts differs (per actor, then across actors).

Failover: when an actor dies or does not answer in time, steps 2-5 run again
for the choices it was to serve, with the same hidden states (earlier layers
are not recomputed): on live replicas of its experts at once, or, where it
was the only host, after Ray has restarted it (bounded by the recovery
timeout; only then does the request fail, naming the actor and its experts).

Rebalancing: the placement (and its tables) can be replaced by a new version between two forward
passes (``switch``; the model marks each pass with ``forward_pass``): never inside one, so every layer
of a pass, and every resend of a layer, uses one placement. Each message names its version; an actor
that does not hold it (it restarted since) answers ``stale`` and is treated as down until its probe
(``adopt``) loads it.

Dimensions: T tokens, K chosen per token, E experts, A actors, R max replicas, N rows sent, D hidden.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeshard.actors.actor_health import ActorHealth
from moeshard.actors.collective.transport import CollectiveTransport
from moeshard.actors.dispatch_plan import (
    DispatchPlan,
    LayerTable,
    LoneTokenPlan,
    build_tables,
    permute_lone_token,
    plan_dispatch,
    plan_lone_token,
)
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.pool.expert_pool import describe_actor
from moeshard.actors.rebalance.meter import LoadMeter
from moeshard.actors.socket.transport import SocketTransport
from moeshard.actors.transport import ActorCallTransport, ActorRef, CompiledGraphTransport, Transport, failure
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.device import resolve_device
from moeshard.kernels import Permutation, RouterOutput, combine, permute
from moeshard.kernels.combine import weighted_row_sum

logger = logging.getLogger(__name__)


class StaleReply(RuntimeError):
    """A reply tagged for another dispatch (a late answer), or from an actor without the dispatch's
    placement version (restarted since): never combined."""


@dataclass(frozen=True)
class LayerResult:
    output: torch.Tensor  # [T, D] sum of the partials that came back
    served: torch.Tensor | None  # [T, K] bool: choices whose actor answered; None when every actor sent rows answered
    failed: dict[int, BaseException]  # actor -> why it is to be routed around


class RemoteExperts:
    """``ExpertsFn`` over expert actors, failing over to replicas and waiting through restarts."""

    def __init__(self, placement: ExpertPlacement, transport: Transport, actors: list[ActorRef], recovery_timeout_s: float):
        self.placement = placement
        self.transport = transport
        self.actors = actors
        self.health = ActorHealth(actors, probe=self._probe)
        self.recovery_timeout_s = recovery_timeout_s
        self.meter = LoadMeter(placement.num_layers, placement.num_experts, placement.num_actors, time.monotonic)
        moe_layers = [layer for layer, experts in enumerate(placement.hosts) if experts]
        self._first_layer = min(moe_layers, default=0)
        self._tables: dict[tuple[frozenset[int], torch.device], list[LayerTable | None]] = {}
        self._tags = itertools.count()
        self._switch = threading.Condition()  # guards placement, _next and _passes
        self._next: tuple[ExpertPlacement, list[ActorRef] | None] | None = None
        self._passes = 0  # forward passes running (``forward_pass``)
        self._unreceived: dict[int, object] = {}  # tag -> ticket of each dispatch a pass sent and has not received
        self._pass_tags = threading.local()  # .passes: per thread (``_passes_here``)

    def tables(self, down: frozenset[int] = frozenset(), device: torch.device = torch.device("cpu")) -> list[LayerTable | None]:
        """The placement's tables routing around ``down``, with their tensors on ``device`` (built once for each)."""
        tables, key, on_host = self._tables, (down, device), (down, torch.device("cpu"))
        if on_host not in tables:
            tables[on_host] = build_tables(self.placement, down)
        if key not in tables:
            tables[key] = [table.to(device) if table is not None else None for table in tables[on_host]]
        return tables[key]

    def _probe(self, actor: ActorRef):
        """Answers once ``actor`` is up and holds the current placement (a restarted actor loads it first)."""
        placement = self.placement
        return actor.handle.adopt.remote(
            placement.version, placement.hosted_by(actor.index), placement.shares_held_by(actor.index)
        )

    # -- switching placements between steps --------------------------------------------
    def switch(self, placement: ExpertPlacement, timeout_s: float, actors: list[ActorRef] | None = None) -> bool:
        """Dispatch with ``placement`` once no forward pass runs (at once if none does); True once it is in use.
        ``actors``: the pool was scaled, these actors (index i at position i) serve the new placement."""
        with self._switch:
            self._next = (placement, actors)
            if self._passes == 0:  # between passes
                self._use_next()
            return self._switch.wait_for(lambda: self.placement.version >= placement.version, timeout=timeout_s)

    def _use_next(self) -> None:
        """Under the lock, between two steps: the new placement, its tables and the actors at once."""
        (placement, actors), self._next = self._next, None
        handles = [a.handle for a in actors] if actors is not None else [a.handle for a in self.actors]
        resized = len(handles) != len(self.actors)
        self.placement, self._tables = placement, {}
        # The list the transport and health share, changed in place.
        self.actors[:] = [ActorRef(i, handle, describe_actor(placement, i)) for i, handle in enumerate(handles)]
        if resized:
            self.health.resize(len(handles))
            self.meter.resize(len(handles))
        logger.info("dispatching with placement version %d over %d expert actors", placement.version, len(handles))
        self._switch.notify_all()

    def layout(self) -> tuple[ExpertPlacement, list[ActorRef]]:
        """The placement in use and the actors serving it, read together."""
        with self._switch:
            return self.placement, list(self.actors)

    @contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Around one forward pass (both micro-batches of a ping-pong step): every MoE layer in it dispatches with
        one placement. A switch asked for meanwhile is taken as the last pass running ends, however it ends (an
        error between layers too): the engine may go idle right after, with no next pass to take it. A pass that
        fails with the other micro-batch's dispatch in flight abandons it: its replies are dropped as they come
        instead of being kept for a wait that will not come."""
        with self._switch:
            self._passes += 1
        passes, sent = self._passes_here(), []
        passes.append(sent)
        try:
            yield
        finally:
            passes.pop()
            for tag in sent:
                ticket = self._unreceived.pop(tag, None)
                if ticket is not None:
                    self.transport.abandon(ticket)
            with self._switch:
                self._passes -= 1
                if self._next is not None and self._passes == 0:
                    self._use_next()

    def _passes_here(self) -> list[list[int]]:
        """This thread's running passes, innermost last: the tags of the dispatches each has sent."""
        if not hasattr(self._pass_tags, "passes"):
            self._pass_tags.passes = []
        return self._pass_tags.passes

    def __call__(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        return self.submit(layer, hidden, routing).wait()

    def submit(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> "PendingDispatch":
        """Steps 2-3 and the start of 4 for every choice: the actors work while the caller does something else."""
        home = hidden.device
        if home.type != "cpu" and not self.transport.carries_device_tensors:
            # rows cross to the actors as host bytes: plan and pack them on the host (docs/gpu.md)
            hidden, routing = hidden.cpu(), RouterOutput(routing.weights.cpu(), routing.expert_ids.cpu())
        dispatch = self._send(LayerWork(layer, hidden, routing, pending=None), deadline=None)
        self.meter.record(layer, routing.expert_ids.long(), dispatch.plan.send_to, layer == self._first_layer)
        dispatch.home = home
        return dispatch

    def _send(self, work: "LayerWork", deadline: float | None) -> "PendingDispatch":
        """Plan the pending choices over the live actors (waiting, up to ``deadline``, for a sole host) and send."""
        lone_token = work.pending is None and work.hidden.shape[0] == 1  # a decode step of one sequence
        while True:
            self.health.refresh()
            down = self.health.down
            table = self.tables(down, work.hidden.device)[work.layer]
            assert table is not None, f"layer {work.layer} is a dense layer: it has no experts"
            if lone_token:
                lone = plan_lone_token(table, work.routing.expert_ids[0].tolist(), work.hidden.device)
                plan, needed = lone.plan, set(lone.actor_of) & down
            else:
                plan = plan_dispatch(table, work.routing.expert_ids.long(), work.pending)
                needed = set(plan.actor_of[plan.actor_of >= 0].unique().tolist()) & down if down else set()
            if not needed:
                break
            deadline = deadline or time.monotonic() + self.recovery_timeout_s  # wait for Ray's restart of the host
            self._wait_for(needed, deadline)
        num_actors, tag = self.placement.num_actors, next(self._tags)
        if lone_token:
            perm, messages = None, self._lone_token_messages(work, table, lone, tag)
        else:
            perm = permute(work.hidden, plan.send_to, num_actors)  # rows [N, D] grouped by actor
            messages = self._messages(work, table, plan, perm, tag)
        ticket = self.transport.send(messages, frozenset(range(num_actors)) - down)
        passes = self._passes_here()
        if passes:  # within a pass: abandoned when it ends, unless received by then
            passes[-1].append(tag)
            self._unreceived[tag] = ticket
        has_rows = [m is not None for m in messages]
        lone = lone if lone_token else None
        return PendingDispatch(self, work, plan, perm, tag, has_rows, ticket, deadline, lone)

    def _messages(
        self, work: "LayerWork", table: LayerTable, plan: DispatchPlan, perm: Permutation, tag: int
    ) -> list[ExpertBatch | None]:
        expert_ids = work.routing.expert_ids.long()  # [T, K]
        messages: list[ExpertBatch | None] = []
        for actor in range(self.placement.num_actors):
            start, end = perm.host_offsets[actor], perm.host_offsets[actor + 1]
            if start == end:
                messages.append(None)
                continue
            tokens = perm.source_token[start:end]  # [n]
            # index_select, not advanced indexing: the same rows, a few times cheaper per call on CPU
            mine = plan.actor_of.index_select(0, tokens) == actor  # [n, K] choices this actor serves
            chosen = expert_ids.index_select(0, tokens)  # [n, K]
            local = table.local_index[actor].index_select(0, chosen.reshape(-1)).view_as(chosen)  # [n, K]
            local_ids = torch.where(mine, local, -1)  # [n, K]
            weights = torch.where(mine, work.routing.weights.index_select(0, tokens), 0.0)  # [n, K]
            messages.append(ExpertBatch(work.layer, tag, perm.rows[start:end], local_ids.int(), weights.float(), self.placement.version))
        return messages

    def _lone_token_messages(self, work: "LayerWork", table: LayerTable, lone: LoneTokenPlan, tag: int) -> list[ExpertBatch | None]:
        """``_messages`` for a token alone, from Python ints: the same batches."""
        weights = work.routing.weights[0].tolist()  # [K] exact as Python floats
        device = work.hidden.device
        messages: list[ExpertBatch | None] = [None] * self.placement.num_actors
        for actor in lone.actors:
            local = table.local_lists[actor]
            mine = [a == actor for a in lone.actor_of]  # [K]
            local_ids = torch.tensor([[local[e] if m else -1 for e, m in zip(lone.expert_ids, mine)]], dtype=torch.int32, device=device)
            chosen = torch.tensor([[w if m else 0.0 for w, m in zip(weights, mine)]], dtype=work.routing.weights.dtype, device=device)
            messages[actor] = ExpertBatch(work.layer, tag, work.hidden, local_ids, chosen.float(), self.placement.version)
        return messages

    def _wait_for(self, actors: set[int], deadline: float) -> None:
        for actor in sorted(actors):
            if not self.health.wait_for(actor, deadline):
                cause = TimeoutError(f"not back after {self.recovery_timeout_s:.0f}s of recovery")
                raise failure(self.actors[actor], cause)


@dataclass(frozen=True)
class LayerWork:
    layer: int
    hidden: torch.Tensor  # [T, D]
    routing: RouterOutput
    pending: torch.Tensor | None  # [T, K] bool: the choices this dispatch is to serve; None: all of them


@dataclass
class PendingDispatch:
    """One layer's dispatch in flight; ``wait`` is steps 4-5, resending what failed until every choice is served."""

    experts: RemoteExperts
    work: LayerWork
    plan: DispatchPlan
    perm: Permutation | None  # None for a token alone: made only if a reply is missing
    tag: int
    has_rows: list[bool]  # [A] actors sent rows
    ticket: object
    deadline: float | None  # recovery deadline, once a layer has had to wait for a restart
    lone: LoneTokenPlan | None = None  # the plan as Python ints, for a token alone
    home: torch.device = torch.device("cpu")  # where the caller's hidden states live; the output goes back there

    def wait(self) -> torch.Tensor:
        return self._wait().to(self.home)

    def _wait(self) -> torch.Tensor:
        dispatch, output = self, None
        while True:
            result = dispatch._collect()
            output = result.output if output is None else output + result.output
            if result.served is None:  # every choice this dispatch was to serve came back
                return output
            pending = ~result.served if dispatch.work.pending is None else dispatch.work.pending & ~result.served
            if not pending.any():
                return output
            for actor, cause in result.failed.items():
                self.experts.health.mark_down(actor, cause)
            self.experts.health.retries += 1
            work = LayerWork(dispatch.work.layer, dispatch.work.hidden, dispatch.work.routing, pending)
            dispatch = self.experts._send(work, dispatch.deadline)

    def _collect(self) -> LayerResult:
        """Steps 4-5 for this dispatch: the partials of actors that failed (or whose reply was lost) are left out."""
        try:
            exchange = self.experts.transport.receive(self.ticket)
        finally:
            self.experts._unreceived.pop(self.tag, None)
        if self.lone is not None and not exchange.failures:
            output = self._lone_token_output(exchange.replies)
            if output is not None:
                return LayerResult(output, None, {})
        failed = dict(exchange.failures)
        if self.perm is None:
            self.perm = permute_lone_token(self.work.hidden, self.lone, len(self.has_rows))
        hidden, offsets = self.work.hidden, self.perm.host_offsets
        answered = torch.ones(len(self.has_rows) + 1, dtype=torch.bool)  # [A + 1]; the last entry stands for -1
        complete = True  # every actor sent rows answered
        rows = []  # [n, D] per actor with work, in actor order; zeros where no usable reply came back
        for actor, has_rows in enumerate(self.has_rows):
            if not has_rows:
                continue
            reply = exchange.replies[actor]
            if reply is not None and reply.tag != self.tag:
                failed[actor] = StaleReply(f"reply tagged {reply.tag} for dispatch {self.tag}")
            elif reply is not None and reply.stale:
                failed[actor] = StaleReply(f"the actor holds no experts of placement version {self.experts.placement.version}")
            elif reply is not None:
                rows.append(reply.rows.to(hidden.device))  # (a transport may deliver them elsewhere: gloo on the host)
                continue
            # No reply: the actor failed, or (a compiled graph fails as a whole) its answer was lost with the graph.
            answered[actor] = False
            complete = False
            rows.append(torch.zeros(offsets[actor + 1] - offsets[actor], hidden.shape[1], dtype=torch.float32, device=hidden.device))
        partials = torch.cat(rows) if len(rows) > 1 else rows[0] if rows else self.perm.rows  # [N, D] in actor order
        if complete:  # each sent partial counts once (a repeat's send_to is -1)
            counted = (self.plan.send_to >= 0).to(torch.float32)  # [T, K]
            return LayerResult(combine(partials, counted, self.perm, dtype=hidden.dtype), None, failed)
        answered = answered.to(hidden.device)
        counted = (self.plan.send_to >= 0) & answered[self.plan.send_to]  # [T, K] each answered partial counts once
        served = (self.plan.actor_of >= 0) & answered[self.plan.actor_of]  # [T, K]
        return LayerResult(combine(partials, counted.to(torch.float32), self.perm, dtype=hidden.dtype), served, failed)

    def _lone_token_output(self, replies: list[ExpertReply | None]) -> torch.Tensor | None:
        """``combine`` of a token alone's partials (each weight 1, in j order): [1, D]; None unless every actor
        sent the token answered for this dispatch (then the general path sorts out what to resend)."""
        partial = {}  # actor -> [1, D]
        for actor in self.lone.actors:
            reply = replies[actor]
            if reply is None or reply.tag != self.tag or reply.stale:
                return None
            partial[actor] = reply.rows
        hidden = self.work.hidden
        chosen = [(j, partial[a].to(hidden.device)) for j, a in enumerate(self.lone.send_to) if a >= 0]
        ones = torch.ones(1, len(self.lone.send_to), device=hidden.device)  # [1, K]
        return weighted_row_sum(chosen, ones, hidden.shape[1], hidden.device).to(hidden.dtype)  # one rounding


TRANSPORT_CLASSES = {
    "actor_calls": ActorCallTransport, "socket": SocketTransport, "compiled_graph": CompiledGraphTransport,
    "collective": CollectiveTransport,
}  # fmt: skip


def remote_experts(config: EngineConfig, placement: ExpertPlacement, actors: list[ActorRef]) -> RemoteExperts:
    """The experts function that dispatches to ``actors`` over the configured transport (built in the coordinator's
    process: the collective transport sends from the device the model runs on there)."""
    if config.cluster.transport == "collective":
        transport = CollectiveTransport(actors, config.cluster.dispatch_timeout_s, resolve_device(config.device))
    else:
        transport = TRANSPORT_CLASSES[config.cluster.transport](actors, config.cluster.dispatch_timeout_s)
    return RemoteExperts(placement, transport, actors, config.cluster.recovery_timeout_s)
