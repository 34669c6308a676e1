"""The collective transport's channel, without Ray: both ends in this process, the actor's on its own thread.

Batches and replies cross bit for bit in every row dtype, two in flight are taken in any order, a peer
without the secret runs nothing, and a silent or vanished actor fails the coordinator's wait by the
deadline instead of hanging it. The transport over real expert actors (outputs equal to the single
process, SIGKILLed and stuck actors) runs in test_cluster.py and test_failover.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moeshard.actors.collective.channel import SECRET_BYTES, ChannelClosed, ChannelTimeout
from moeshard.actors.collective.link import ChannelLink, join_channel
from moeshard.actors.collective.server import open_channel
from moeshard.actors.wire import ExpertBatch, ExpertReply

SECRET = b"s" * SECRET_BYTES
CPU = torch.device("cpu")


_OPENED: list[ChannelLink] = []


@pytest.fixture(autouse=True)
def _close_links():
    """Each test's links closed as it ends: the actor's thread, blocked in gloo's recv, ends before the process
    does (a gloo group torn down at exit under a thread still in it can crash the interpreter)."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def _open(handle, secret: bytes = SECRET) -> ChannelLink:
    address = open_channel("127.0.0.1", SECRET, CPU, "cpu", handle)
    link = ChannelLink(None, join_channel(address, secret, "127.0.0.1", CPU))
    _OPENED.append(link)
    return link


def _batch(tag: int, n: int, dtype: torch.dtype, d: int = 24, k: int = 2) -> ExpertBatch:
    g = torch.Generator().manual_seed(tag)
    rows = torch.randn(n, d, generator=g).to(dtype)
    local_ids = torch.randint(-1, 4, (n, k), generator=g, dtype=torch.int32)
    return ExpertBatch(layer=tag % 3, tag=tag, rows=rows, local_ids=local_ids, weights=torch.rand(n, k, generator=g), version=7)


def test_the_store_listens_on_loopback_only():
    address = open_channel("127.0.0.1", SECRET, CPU, "cpu", lambda batch: None)
    assert address.host == "127.0.0.1" and address.data_backend == "gloo"
    join_channel(address, SECRET, "127.0.0.1", CPU)  # let the actor's thread finish joining


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batches_and_replies_cross_bit_for_bit(dtype):
    seen: list[ExpertBatch] = []

    def handle(batch: ExpertBatch) -> ExpertReply:
        seen.append(batch)
        return ExpertReply(batch.tag, batch.rows.float() * 2 + batch.weights.sum(1, keepdim=True))

    link = _open(handle)
    sent = [_batch(tag, n, dtype) for tag, n in ((3, 1), (4, 17), (5, 300))]
    for batch in sent:
        link.send(batch)
    deadline = time.monotonic() + 30
    replies = {tag: link.wait(tag, deadline) for tag in (5, 3, 4)}  # taken out of order: filed by tag
    for batch, got in zip(sent, seen):
        assert (got.layer, got.tag, got.version) == (batch.layer, batch.tag, batch.version)
        for name in ("rows", "local_ids", "weights"):
            mine, theirs = getattr(batch, name), getattr(got, name)
            assert theirs.dtype == mine.dtype and torch.equal(theirs, mine), name
        reply = replies[batch.tag]
        assert reply.tag == batch.tag and not reply.stale
        assert torch.equal(reply.rows, batch.rows.float() * 2 + batch.weights.sum(1, keepdim=True))


def test_forgotten_replies_are_dropped_whether_read_before_or_after():
    """The replies of an abandoned dispatch (a ping-pong pass that failed) are not kept for a wait that will not come."""
    link = _open(lambda batch: ExpertReply(batch.tag, batch.rows.float() + 1))
    for tag in (3, 4, 5, 6):
        link.send(_batch(tag, 2, torch.float32))
    deadline = time.monotonic() + 30
    torch.testing.assert_close(link.wait(5, deadline).rows, _batch(5, 2, torch.float32).rows + 1)  # reads 3 and 4 first
    assert link.replies.filed == {3, 4}
    link.forget(3)  # read: dropped now
    link.forget(6)  # not read yet: dropped when a later wait reads through it
    link.send(_batch(7, 2, torch.float32))
    torch.testing.assert_close(link.wait(7, deadline).rows, _batch(7, 2, torch.float32).rows + 1)
    assert link.replies.filed == {4} and link.replies.forgotten == frozenset()
    torch.testing.assert_close(link.wait(4, deadline).rows, _batch(4, 2, torch.float32).rows + 1)


def test_a_stale_reply_carries_no_rows_and_the_next_reply_is_intact():
    def handle(batch: ExpertBatch) -> ExpertReply:
        if batch.tag == 9:
            return ExpertReply(batch.tag, batch.rows[:0].float(), stale=True)
        return ExpertReply(batch.tag, batch.rows.float() + 1)

    link = _open(handle)
    later = _batch(10, 3, torch.float32)
    link.send(_batch(9, 5, torch.float32))
    link.send(later)
    reply = link.wait(9, time.monotonic() + 30)
    assert reply.stale and reply.tag == 9 and reply.rows.shape == (0, 24)
    assert torch.equal(link.wait(10, time.monotonic() + 30).rows, later.rows + 1)


def test_a_reply_out_of_order_closes_the_link():
    """Replies come back in the order the batches were sent; a peer that breaks it is not trusted further."""
    link = _open(lambda batch: ExpertReply(batch.tag + 100, batch.rows.float()))
    link.send(_batch(1, 4, torch.float32))
    with pytest.raises(ChannelClosed, match="tagged 101 where batch 1 was next"):
        link.wait(1, time.monotonic() + 30)
    with pytest.raises(ChannelClosed):
        link.wait(1, time.monotonic() + 30)


def test_a_peer_without_the_secret_runs_nothing():
    calls = []
    link = _open(lambda batch: calls.append(batch) or ExpertReply(batch.tag, batch.rows.float()), secret=b"x" * SECRET_BYTES)
    link.send(_batch(1, 4, torch.float32))
    with pytest.raises(ChannelClosed):
        link.wait(1, time.monotonic() + 30)  # the actor's end closed the channel instead of answering
    assert calls == []


def test_a_silent_actor_times_out_and_a_vanished_one_fails_at_once():
    release = threading.Event()

    def stuck(batch: ExpertBatch) -> ExpertReply:
        release.wait(30)
        return ExpertReply(batch.tag, batch.rows.float())

    link = _open(stuck)
    link.send(_batch(1, 4, torch.float32))
    started = time.monotonic()
    with pytest.raises(ChannelTimeout):
        link.wait(1, started + 0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(ChannelClosed):  # the timed-out receive closed the channel: nothing more is read
        link.wait(1, time.monotonic() + 5)
    release.set()

    def broken(batch: ExpertBatch) -> ExpertReply:
        raise RuntimeError("the actor's end fails")  # its thread ends and its end of the channel closes

    link = _open(broken)
    link.send(_batch(2, 3, torch.float32))
    started = time.monotonic()
    with pytest.raises(ChannelClosed) as raised:
        link.wait(2, started + 30)
    assert not isinstance(raised.value, ChannelTimeout) and time.monotonic() - started < 10


def test_posting_after_the_peer_reset_the_channel_fails_as_a_closed_channel():
    """A receive or send posted once the actor's end is gone fails at once, as ``ChannelClosed`` (what the dispatch
    fails over on), not as gloo's own error."""

    def dies_on_the_second(batch: ExpertBatch) -> ExpertReply:
        if batch.tag == 2:
            raise RuntimeError("the actor's end fails")
        return ExpertReply(batch.tag, batch.rows.float())

    link = _open(dies_on_the_second)
    first = _batch(1, 4, torch.float32)
    link.send(first)
    link.send(_batch(2, 4, torch.float32))
    assert torch.equal(link.wait(1, time.monotonic() + 30).rows, first.rows)
    time.sleep(0.5)  # the actor's end closes: the connection is reset before the next receive is posted
    started = time.monotonic()
    with pytest.raises(ChannelClosed):
        link.wait(2, started + 30)
    assert time.monotonic() - started < 10
    with pytest.raises(ChannelClosed):
        link.channel.send_batch(_batch(3, 4, torch.float32))
