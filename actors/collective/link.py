"""The coordinator's end of one collective channel: joining the channel an actor opened, and the batches and
replies in flight on it (``ChannelLink``). No Ray here: the transport (``transport.py``) asks the actor through
Ray to open the channel, and the GPU tests drive a link between two processes without it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from moeshard.actors.collective.channel import COORDINATOR_RANK, ChannelAddress, ChannelClosed, ChannelTimeout, TensorChannel
from moeshard.actors.collective.server import JOIN_TIMEOUT
from moeshard.actors.filed_replies import FiledReplies
from moeshard.actors.wire import ExpertBatch, ExpertReply


def join_channel(address: ChannelAddress, secret: bytes, node_ip: str, device: torch.device) -> TensorChannel:
    """Join the channel an actor opened at ``address`` as the coordinator, and send it ``secret``."""
    store = dist.TCPStore(address.host, address.port, 2, False, timeout=JOIN_TIMEOUT)
    host = "127.0.0.1" if address.host == "127.0.0.1" else node_ip  # this end's interface
    channel = TensorChannel.open(store, COORDINATOR_RANK, host, address, device)
    channel.send_secret(secret)
    return channel


class ChannelLink:
    """One channel to one expert actor (the process behind ``handle`` when it was opened)."""

    def __init__(self, handle: object, channel: TensorChannel):
        self.handle = handle
        self.channel = channel
        self.sent: deque[tuple[int, int, int]] = deque()  # (tag, rows, hidden) of each batch not yet answered, in order
        self.sends: dict[int, list[dist.Work]] = {}  # tag -> the batch's sends (they hold its tensors until done)
        self.replies: FiledReplies[ExpertReply] = FiledReplies()  # by tag
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def send(self, batch: ExpertBatch) -> None:
        with self._lock:
            self.sends[batch.tag] = self.channel.send_batch(batch)
            self.sent.append((batch.tag, *batch.rows.shape))

    def wait(self, tag: int, deadline: float) -> ExpertReply:
        """The reply to batch ``tag``, reading earlier replies first (they are filed for their own ``wait``)."""
        with self._lock:
            while tag not in self.replies:
                if self.error is not None:
                    raise ChannelClosed(f"the channel to the expert actor was lost: {self.error}") from self.error
                if not self.sent:
                    raise ChannelClosed(f"no batch tagged {tag} is waiting for a reply")
                try:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ChannelTimeout("no reply by the dispatch deadline")
                    sent_tag, num_rows, hidden = self.sent[0]
                    reply = self.channel.recv_reply(num_rows, hidden, timedelta(seconds=remaining))
                    if reply.tag != sent_tag:  # replies come back in the order sent: anything else is a broken peer
                        raise ChannelClosed(f"a reply tagged {reply.tag} where batch {sent_tag} was next")
                except ChannelClosed as exc:
                    self.error = exc
                    raise
                self.sent.popleft()
                self.sends.pop(sent_tag, None)  # replied to: its sends are complete
                self.replies.file(sent_tag, reply)
            return self.replies.take(tag)

    def forget(self, tag: int) -> None:
        """No one will wait for the reply to batch ``tag``: dropped if it was read, else when a later wait reads
        through it (replies come back in order)."""
        with self._lock:
            self.replies.forget(tag)

    def close(self) -> None:
        self.error = self.error or ChannelClosed("closed by the coordinator")
        self.sends.clear()
        self.channel.close()
