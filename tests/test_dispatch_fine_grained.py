"""Dispatch, experts and combine over expert actors with many small experts (E = 64, 128; K = 8).

The actors are in-process stand-ins that decode the wire message and run their
stack of experts exactly as ``ExpertActor`` does, so this needs no Ray. The
oracle is transformers' own expert loop (``Qwen3MoeExperts``, eager) on the
same weights. Each layer sends at most one message per actor, however many of
its experts the tokens chose.

Dimensions: T tokens, D hidden, I expert hidden, E experts, K chosen per token.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from moeshard.actors.dispatch import RemoteExperts
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.transport import ActorRef, Exchange
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster.model.moe import ExpertStack, LocalExperts
from moeshard.kernels import route

D, I = 48, 16  # noqa: E741


class InProcessTransport:
    """Runs each message on its actor's expert stack; records how many messages each actor got per layer."""

    def __init__(self, stacks: list[dict[int, ExpertStack]]):
        self.stacks = stacks
        self.sent: list[list[int]] = []  # per exchange: actors that got a message

    def send(self, messages: list[bytes | None], live: frozenset[int]) -> list[bytes | None]:
        self.sent.append([a for a, m in enumerate(messages) if m is not None])
        replies = []
        for actor, message in enumerate(messages):
            if message is None:
                replies.append(None)
                continue
            batch = ExpertBatch.decode(message)
            out = self.stacks[actor][batch.layer].run(batch.rows, batch.local_ids.long(), batch.weights)
            replies.append(ExpertReply(batch.tag, out).encode())
        return replies

    def receive(self, ticket: list[bytes | None]) -> Exchange:
        return Exchange(ticket, {})

    def exchange(self, messages: list[bytes | None], live: frozenset[int]) -> Exchange:
        return self.receive(self.send(messages, live))

    def close(self) -> None:
        pass


def _stack(ids: list[int], w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> ExpertStack:
    return ExpertStack(expert_ids=tuple(ids), w1=w1[ids], w3=w3[ids], w2=w2[ids])


def _layout(E: int, actors: int, replicated: bool) -> ExpertPlacement:
    if not replicated:
        return ExpertPlacement.even(1, E, actors)
    expert_map = {e: [e % actors, (e + 1) % actors] if e % 3 == 0 else [e % actors] for e in range(E)}
    return ExpertPlacement.from_expert_map(1, E, actors, expert_map)


@pytest.mark.parametrize("E, K", [(64, 8), (128, 8)])
@pytest.mark.parametrize("actors, replicated", [(1, False), (3, False), (4, False), (5, True)])
@pytest.mark.parametrize("T", [1, 33, 257])
def test_remote_experts_equal_transformers_experts(E, K, actors, replicated, T):
    torch.manual_seed(E + K + actors + T)
    hf = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E))
    with torch.no_grad():
        hf.gate_up_proj.normal_(0, D**-0.5)  # [E, 2I, D]: gate rows then up rows
        hf.down_proj.normal_(0, I**-0.5)  # [E, D, I]
    w1, w3 = hf.gate_up_proj.detach()[:, :I], hf.gate_up_proj.detach()[:, I:]  # [E, I, D] each
    w2 = hf.down_proj.detach()  # [E, D, I]
    hidden = torch.randn(T, D)  # [T, D]
    routing = route(hidden @ torch.randn(E, D).T, K, normalize=False)  # [T, K] each

    placement = _layout(E, actors, replicated)
    stacks = [{0: _stack(placement.hosted_by(a)[0], w1, w3, w2)} for a in range(actors)]
    transport = InProcessTransport(stacks)
    refs = [ActorRef(a, None, f"in-process actor {a}") for a in range(actors)]
    remote = RemoteExperts(placement, transport, refs, recovery_timeout_s=120.0)
    local = LocalExperts({0: _stack(list(range(E)), w1, w3, w2)})
    with torch.no_grad():
        expected = hf(hidden, routing.expert_ids.long(), routing.weights)  # [T, D]

    got = remote(0, hidden, routing)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local(0, hidden, routing), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote.submit(0, hidden, routing).wait(), got, rtol=0, atol=0)

    # One message per actor with work, per layer: E and K change the rows, never the number of messages.
    chosen_actors = {a for a in range(actors) for e in routing.expert_ids.unique().tolist() if a in placement.hosts[0][e]}
    for sent in transport.sent:
        assert len(sent) == len(set(sent)) <= actors
        assert set(sent) <= chosen_actors
    if not replicated:
        assert set(transport.sent[0]) == chosen_actors
