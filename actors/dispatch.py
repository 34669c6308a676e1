"""The coordinator's experts function: all-to-all dispatch of one MoE layer over the expert actors.

    1. route       (done by the model: weights, expert ids [T, K])
    2. plan        expert ids -> destination actor per choice (replicas spread by token),
                   a token sent to an actor once even when several of its experts live there
    3. dispatch    permute rows by destination actor (the same kernel that groups by expert)
                   -> one message per actor with work: its rows, their local expert ids and weights
    4. experts     each actor runs its experts and returns its weighted partial sums
                   (``submit`` returns here: the coordinator runs the shared expert meanwhile)
    5. combine     sum each token's partials (weight 1 per actor it was sent to)

One message per actor with work per layer, however many of its experts the
layer's tokens chose (E = 128, K = 8 sends no more messages than E = 8, K = 2).

This is the same computation as ``LocalExperts``; only the summation order of
a token's experts differs (per actor, then across actors).

Dimensions: T tokens, K chosen per token, E experts, A actors, R max replicas, N rows sent, D hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.transport import ActorCallTransport, ActorRef, CompiledGraphTransport, Transport
from moeshard.actors.wire import ExpertBatch, decode_rows
from moeshard.cluster.engine.config import EngineConfig
from moeshard.kernels import Permutation, RouterOutput, combine, dedupe_destinations, permute

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTable:
    """Dispatch lookup tables of one layer."""

    replicas: torch.Tensor  # [E, R] int64 actor ids hosting each expert, padded with -1
    num_replicas: torch.Tensor  # [E] int64
    local_index: torch.Tensor  # [A, E] int64 position of expert e in actor a's stack, -1 if not hosted


@dataclass(frozen=True)
class DispatchPlan:
    actor_of: torch.Tensor  # [T, K] int64 actor chosen for each (token, choice)
    send_to: torch.Tensor  # [T, K] int64 actor_of with repeats within a token set to -1


def build_tables(placement: ExpertPlacement) -> list[LayerTable | None]:
    """One table per layer; None for a dense layer (no experts)."""
    tables: list[LayerTable | None] = []
    for experts in placement.hosts:
        if not experts:
            tables.append(None)
            continue
        width = max(len(actors) for actors in experts)
        replicas = torch.full((len(experts), width), -1, dtype=torch.int64)
        local_index = torch.full((placement.num_actors, len(experts)), -1, dtype=torch.int64)
        for e, actors in enumerate(experts):
            replicas[e, : len(actors)] = torch.tensor(actors)
        for a in range(placement.num_actors):
            hosted = [e for e, actors in enumerate(experts) if a in actors]  # stack order: sorted expert ids
            local_index[a, hosted] = torch.arange(len(hosted))
        num_replicas = torch.tensor([len(actors) for actors in experts], dtype=torch.int64)
        tables.append(LayerTable(replicas=replicas, num_replicas=num_replicas, local_index=local_index))
    return tables


def plan_dispatch(table: LayerTable, expert_ids: torch.Tensor) -> DispatchPlan:
    """expert_ids [T, K] -> the actor serving each choice; replicas are taken round-robin by token."""
    t = expert_ids.shape[0]
    token = torch.arange(t, dtype=torch.int64)[:, None]  # [T, 1]
    replica = token % table.num_replicas[expert_ids]  # [T, K]
    actor_of = table.replicas[expert_ids, replica]  # [T, K]
    return DispatchPlan(actor_of=actor_of, send_to=dedupe_destinations(actor_of))


class RemoteExperts:
    """``ExpertsFn`` over expert actors."""

    def __init__(self, placement: ExpertPlacement, transport: Transport):
        self.placement = placement
        self.tables = build_tables(placement)
        self.transport = transport

    def __call__(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        return self.submit(layer, hidden, routing).wait()

    def submit(self, layer: int, hidden: torch.Tensor, routing: RouterOutput) -> "PendingDispatch":
        """Steps 2-3 and the start of 4: the actors work while the caller does something else."""
        expert_ids = routing.expert_ids.long()  # [T, K]
        table = self.tables[layer]
        assert table is not None, f"layer {layer} is a dense layer: it has no experts"
        plan = plan_dispatch(table, expert_ids)
        perm = permute(hidden, plan.send_to, self.placement.num_actors)  # rows [N, D] grouped by actor
        offsets = perm.expert_offsets.tolist()
        messages: list[bytes | None] = []
        for actor in range(self.placement.num_actors):
            start, end = offsets[actor], offsets[actor + 1]
            if start == end:
                messages.append(None)
                continue
            tokens = perm.source_token[start:end]  # [n]
            mine = plan.actor_of[tokens] == actor  # [n, K] choices this actor serves
            local_ids = torch.where(mine, table.local_index[actor][expert_ids[tokens]], -1)  # [n, K]
            weights = torch.where(mine, routing.weights[tokens], 0.0)  # [n, K]
            batch = ExpertBatch(layer=layer, rows=perm.rows[start:end], local_ids=local_ids.int(), weights=weights.float())
            messages.append(batch.encode())
        return PendingDispatch(self.transport, self.transport.send(messages), plan, perm)


@dataclass
class PendingDispatch:
    """One layer's dispatch in flight; ``wait`` is steps 4-5."""

    transport: Transport
    ticket: object
    plan: DispatchPlan
    perm: Permutation

    def wait(self) -> torch.Tensor:
        replies = self.transport.receive(self.ticket)
        partials = torch.cat([decode_rows(r) for r in replies if r is not None])  # [N, D] in actor order
        ones = (self.plan.send_to >= 0).to(torch.float32)  # [T, K] each partial counts once
        return combine(partials, ones, self.perm)  # [T, D]


TRANSPORTS = {"actor_calls": ActorCallTransport, "compiled_graph": CompiledGraphTransport}


def remote_experts(config: EngineConfig, placement: ExpertPlacement, actors: list[ActorRef]) -> RemoteExperts:
    """The experts function that dispatches to ``actors`` over the configured transport."""
    transport = TRANSPORTS[config.cluster.transport](actors, config.cluster.dispatch_timeout_s)
    return RemoteExperts(placement, transport)
