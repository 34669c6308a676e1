"""Dispatch, experts and combine over expert actors: many small experts (E = 64, 128; K = 8), a token alone,
and a new placement taken between two forward passes.

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

from moeshard.actors.dispatch import LayerWork, RemoteExperts
from moeshard.actors.dispatch_plan import plan_dispatch, plan_lone_token
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.transport import ActorRef, Exchange
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster.model.moe import ExpertStack, LocalExperts
from moeshard.kernels import route

D, I = 48, 16  # noqa: E741


class InProcessTransport:
    """Runs each batch on its actor's expert stack, through the wire encoding both ways; records how many batches
    each actor got per layer."""

    carries_device_tensors = False

    def __init__(self, stacks: list[dict[int, ExpertStack]]):
        self.stacks = stacks
        self.sent: list[list[int]] = []  # per exchange: actors that got a message
        self.messages: list[list[ExpertBatch | None]] = []  # per exchange: what each actor was sent
        self.abandoned: list[list[ExpertReply | None]] = []  # tickets abandoned, in order

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> list[ExpertReply | None]:
        self.sent.append([a for a, m in enumerate(messages) if m is not None])
        self.messages.append(messages)
        replies = []
        for actor, message in enumerate(messages):
            if message is None:
                replies.append(None)
                continue
            batch = ExpertBatch.decode(message.encode())
            out = self.stacks[actor][batch.layer].run(batch.rows, batch.local_ids.long(), batch.weights)
            replies.append(ExpertReply.decode(ExpertReply(batch.tag, out).encode()))
        return replies

    def receive(self, ticket: list[ExpertReply | None]) -> Exchange:
        return Exchange(ticket, {})

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]) -> Exchange:
        return self.receive(self.send(messages, live))

    def abandon(self, ticket: list[ExpertReply | None]) -> None:
        self.abandoned.append(ticket)

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


def _remote_and_local(E: int, actors: int, replicated: bool) -> tuple[RemoteExperts, LocalExperts]:
    """Experts over in-process actors (with ``replicated``, every third expert on two of them) and the same
    experts in one stack."""
    torch.manual_seed(E + actors)
    w1, w3 = torch.randn(E, I, D) * D**-0.5, torch.randn(E, I, D) * D**-0.5  # [E, I, D]
    w2 = torch.randn(E, D, I) * I**-0.5  # [E, D, I]
    placement = _layout(E, actors, replicated)
    transport = InProcessTransport([{0: _stack(placement.hosted_by(a)[0], w1, w3, w2)} for a in range(actors)])
    refs = [ActorRef(a, None, f"in-process actor {a}") for a in range(actors)]
    return RemoteExperts(placement, transport, refs, recovery_timeout_s=120.0), LocalExperts(
        {0: _stack(list(range(E)), w1, w3, w2)}
    )


@pytest.mark.parametrize("E, K, actors", [(8, 2, 2), (8, 2, 3), (64, 8, 5)])
@pytest.mark.parametrize("replicated", [False, True])
def test_a_token_alone_sends_the_bytes_and_gets_the_output_of_the_general_path(E, K, actors, replicated):
    """A decode step of one sequence takes the Python path (plan, messages, combine); forcing the general
    path (every choice pending) must send the same bytes and give the same output, bit for bit, wherever
    the two plans agree (a lone token's choices of replicated experts may be spread over actors the
    general plan would not use: then only the sum's order differs)."""
    remote, local = _remote_and_local(E, actors, replicated)
    agreed = 0
    for seed in range(20):
        hidden = torch.randn(1, D, generator=torch.Generator().manual_seed(seed))  # [1, D]
        routing = route(hidden @ torch.randn(E, D).T, K)  # [1, K]
        before = len(remote.transport.sent)
        fast = remote(0, hidden, routing)
        torch.testing.assert_close(fast, local(0, hidden, routing), rtol=1e-5, atol=1e-5)
        (table,) = remote.tables()
        lone = plan_lone_token(table, routing.expert_ids[0].tolist())
        if list(lone.actor_of) != plan_dispatch(table, routing.expert_ids.long()).actor_of[0].tolist():
            assert replicated
            continue
        agreed += 1
        general = remote._send(LayerWork(0, hidden, routing, pending=torch.ones(1, K, dtype=torch.bool)), deadline=None)
        assert general.lone is None
        fast_sent, general_sent = remote.transport.messages[before], remote.transport.messages[before + 1]
        assert [m is None for m in fast_sent] == [m is None for m in general_sent]
        for a, b in zip(fast_sent, general_sent):  # the same batch but for its tag (a dispatch's own number)
            if a is not None:
                x, y = a, b
                assert (x.layer, x.version, x.tag + 1) == (y.layer, y.version, y.tag)
                for name in ("rows", "local_ids", "weights"):
                    u, v = getattr(x, name), getattr(y, name)
                    assert u.dtype == v.dtype and torch.equal(u, v), name
        assert torch.equal(general._collect().output, fast)
    assert agreed >= 10


class FailsActorOneOnce(InProcessTransport):
    """The first message to actor 1 comes back as if the actor died, or with a reply tagged for another dispatch."""

    def __init__(self, stacks: list[dict[int, ExpertStack]], how: str):
        super().__init__(stacks)
        self.how, self.failed = how, False

    def receive(self, ticket: list[ExpertReply | None]) -> Exchange:
        replies, failures = list(ticket), {}
        if replies[1] is not None and not self.failed:
            self.failed = True
            if self.how == "died":
                replies[1], failures[1] = None, RuntimeError("actor 1 died")
            else:
                reply = replies[1]
                replies[1] = ExpertReply(reply.tag + 1000, reply.rows)
        return Exchange(replies, failures)


@pytest.mark.parametrize("how", ["died", "late reply"])
def test_a_token_alone_whose_actor_fails_is_resent_to_replicas(how):
    E, K = 8, 2
    torch.manual_seed(0)
    w1, w3, w2 = torch.randn(E, I, D) * D**-0.5, torch.randn(E, I, D) * D**-0.5, torch.randn(E, D, I) * I**-0.5
    placement = ExpertPlacement.from_expert_map(1, E, 3, {e: [e % 3, (e + 1) % 3] for e in range(E)})  # two hosts each
    transport = FailsActorOneOnce([{0: _stack(placement.hosted_by(a)[0], w1, w3, w2)} for a in range(3)], how)
    remote = RemoteExperts(placement, transport, [ActorRef(a, None, f"in-process actor {a}") for a in range(3)], 120.0)
    remote.health.probe, remote.health.refresh = (lambda actor: None), (lambda: None)  # no Ray: actor 1 stays down
    local = LocalExperts({0: _stack(list(range(E)), w1, w3, w2)})
    for seed in range(40):  # a token that sends rows to actor 1
        hidden = torch.randn(1, D, generator=torch.Generator().manual_seed(seed))  # [1, D]
        routing = route(hidden @ torch.randn(E, D).T, K)
        if plan_dispatch(remote.tables()[0], routing.expert_ids.long()).actor_of.eq(1).any():
            break
    got = remote(0, hidden, routing)
    torch.testing.assert_close(got, local(0, hidden, routing), rtol=1e-5, atol=1e-5)
    assert transport.failed and remote.health.down == {1} and remote.health.retries == 1
    assert 1 not in transport.sent[-1]  # the resend went to the replicas


def test_a_switch_asked_for_during_a_pass_is_taken_when_the_pass_ends():
    """A new placement asked for while a forward pass runs is not used by that pass's later layers, and is in
    use as soon as the pass ends, also when it ends in an error between layers: the engine may go idle right
    after, with no next pass to take it (the pool's manager then waited its whole switch timeout)."""
    E, actors, T = 8, 2, 5
    torch.manual_seed(1)
    w1, w3 = torch.randn(E, I, D) * D**-0.5, torch.randn(E, I, D) * D**-0.5  # [E, I, D]
    w2 = torch.randn(E, D, I) * I**-0.5  # [E, D, I]
    placement = ExpertPlacement.even(2, E, actors)  # MoE layers 0 and 1
    stacks = [{layer: _stack(placement.hosted_by(a)[layer], w1, w3, w2) for layer in (0, 1)} for a in range(actors)]
    transport = InProcessTransport(stacks)
    remote = RemoteExperts(placement, transport, [ActorRef(a, None, f"in-process actor {a}") for a in range(actors)], 120.0)
    local = LocalExperts({layer: _stack(list(range(E)), w1, w3, w2) for layer in (0, 1)})
    hidden = torch.randn(T, D)  # [T, D]
    routing = route(hidden @ torch.randn(E, D).T, 2, normalize=True)  # [T, 2] each

    def versions_sent() -> set[int]:
        return {m.version for m in transport.messages[-1] if m is not None}

    def version(v: int) -> ExpertPlacement:
        return placement.model_copy(update={"version": v})

    with remote.forward_pass():
        torch.testing.assert_close(remote(0, hidden, routing), local(0, hidden, routing), rtol=1e-5, atol=1e-5)
        assert not remote.switch(version(1), timeout_s=0.0)  # inside a pass: not yet
        torch.testing.assert_close(remote(1, hidden, routing), local(1, hidden, routing), rtol=1e-5, atol=1e-5)
        assert versions_sent() == {0} and remote.placement.version == 0  # the whole pass on the placement it began with
    assert remote.placement.version == 1  # taken as the pass ended
    with remote.forward_pass():
        remote(0, hidden, routing)
    assert versions_sent() == {1}

    with pytest.raises(RuntimeError, match="between layers"):
        with remote.forward_pass():
            remote(0, hidden, routing)
            assert not remote.switch(version(2), timeout_s=0.0)
            raise RuntimeError("a pass cut short between layers")
    assert remote.placement.version == 2  # an error ends the pass too: the next switch is not left waiting

    with remote.forward_pass():  # two passes at once (ping-pong): the switch waits for both
        with remote.forward_pass():
            assert not remote.switch(version(3), timeout_s=0.0)
        assert remote.placement.version == 2
    assert remote.placement.version == 3
    assert remote.switch(version(4), timeout_s=0.0)  # between passes: at once
    remote(0, hidden, routing)
    assert versions_sent() == {4}


def test_a_pass_that_fails_abandons_the_dispatches_it_sent_and_did_not_receive():
    """Ping-pong: micro-batch A's wait fails with B's dispatch in flight. B's ticket is abandoned as the pass
    ends (its replies are dropped as they come, not kept for a wait that will not come); a received one never
    is, nor one sent outside a pass, nor an outer pass's by a pass nested in it."""
    E, actors, T = 8, 2, 6
    torch.manual_seed(2)
    w1, w3 = torch.randn(E, I, D) * D**-0.5, torch.randn(E, I, D) * D**-0.5  # [E, I, D]
    w2 = torch.randn(E, D, I) * I**-0.5  # [E, D, I]
    placement = ExpertPlacement.even(1, E, actors)
    transport = InProcessTransport([{0: _stack(placement.hosted_by(a)[0], w1, w3, w2)} for a in range(actors)])
    remote = RemoteExperts(placement, transport, [ActorRef(a, None, f"in-process actor {a}") for a in range(actors)], 120.0)
    local = LocalExperts({0: _stack(list(range(E)), w1, w3, w2)})
    hidden = torch.randn(T, D)  # [T, D]
    routing = route(hidden @ torch.randn(E, D).T, 2, normalize=True)  # [T, 2] each
    a_rows, b_rows = slice(0, 3), slice(3, 6)

    def half(rows: slice):
        return hidden[rows], type(routing)(routing.weights[rows], routing.expert_ids[rows])

    with pytest.raises(RuntimeError, match="micro-batch A"):
        with remote.forward_pass():
            a, b = remote.submit(0, *half(a_rows)), remote.submit(0, *half(b_rows))
            a.wait()
            raise RuntimeError("micro-batch A failed")
    assert transport.abandoned == [b.ticket] and remote._unreceived == {}

    outside = remote.submit(0, *half(a_rows))  # not in a pass: nothing to abandon it
    with remote.forward_pass():
        outer = remote.submit(0, *half(b_rows))
        with remote.forward_pass():
            inner = remote.submit(0, *half(a_rows))
        assert transport.abandoned[1:] == [inner.ticket]
        torch.testing.assert_close(outer.wait(), local(0, *half(b_rows)), rtol=1e-5, atol=1e-5)
    assert transport.abandoned[1:] == [inner.ticket] and remote._unreceived == {}
    torch.testing.assert_close(outside.wait(), local(0, *half(a_rows)), rtol=1e-5, atol=1e-5)
