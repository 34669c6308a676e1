"""The ``collective`` transport: each layer's batches as tensors over one torch.distributed pair per expert actor.

Where the ``socket`` transport serialises a batch into bytes, this one hands its tensors to a
two-rank process group (``channel.py``): gloo between host tensors, NCCL between GPUs. Ray keeps the
control path: the coordinator asks each actor once, through Ray, to open a channel
(``ExpertActor.open_channel``, with a secret of this transport's), joins it, and from then on every MoE
layer is one batch to each actor with work and one reply back. Two layers may be in flight on a channel
(ping-pong micro-batches); replies come back in the order the batches were sent and are filed by tag.

Failures look as they do with the socket transport: an actor that dies closes its channel (the pending
receive, and any later one, fails at once); one that does not answer by the dispatch deadline fails with
``ChannelTimeout``, and the timed-out receive closes the channel, so a late reply is never read. The
dispatch marks the actor down; once Ray has it back the next send opens a new channel to the new process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError

from moeshard.actors.collective.channel import (
    COORDINATOR_RANK,
    SECRET_BYTES,
    ChannelAddress,
    ChannelClosed,
    ChannelTimeout,
    TensorChannel,
)
from moeshard.actors.collective.server import JOIN_TIMEOUT
from moeshard.actors.expert_actor import CONTROL_GROUP
from moeshard.actors.transport import ActorRef, LinkTransport
from moeshard.actors.wire import ExpertBatch, ExpertReply

logger = logging.getLogger(__name__)


def join_channel(address: ChannelAddress, secret: bytes, node_ip: str, device: torch.device) -> TensorChannel:
    """Join the channel an actor opened at ``address`` as the coordinator, and send it ``secret``."""
    store = dist.TCPStore(address.host, address.port, 2, False, timeout=JOIN_TIMEOUT)
    host = "127.0.0.1" if address.host == "127.0.0.1" else node_ip  # this end's interface
    channel = TensorChannel.open(store, COORDINATOR_RANK, host, address, device)
    channel.send_secret(secret)
    return channel


class _Link:
    """One channel to one expert actor (the process behind ``handle`` when it was opened)."""

    def __init__(self, handle: object, channel: TensorChannel):
        self.handle = handle
        self.channel = channel
        self.sent: deque[tuple[int, int, int]] = deque()  # (tag, rows, hidden) of each batch not yet answered, in order
        self.sends: dict[int, list[dist.Work]] = {}  # tag -> the batch's sends (they hold its tensors until done)
        self.replies: dict[int, ExpertReply] = {}  # tag -> reply read but not yet taken
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
                except ChannelClosed as exc:
                    self.error = exc
                    raise
                self.sent.popleft()
                self.sends.pop(sent_tag, None)  # replied to: its sends are complete
                self.replies[reply.tag] = reply
            return self.replies.pop(tag)

    def close(self) -> None:
        self.error = self.error or ChannelClosed("closed by the coordinator")
        self.sends.clear()
        self.channel.close()


class CollectiveTransport(LinkTransport):
    carries_device_tensors = True  # NCCL between GPUs; gloo moves host copies
    open_errors = (RayActorError, GetTimeoutError, ChannelClosed, RuntimeError)  # RuntimeError: the store or a group did not form

    def __init__(self, actors: list[ActorRef], timeout_s: float, device: torch.device = torch.device("cpu")):
        super().__init__(actors, timeout_s, SECRET_BYTES)
        self.device = device  # the coordinator's: NCCL carries the rows when it and the actor are on CUDA

    def _open(self, actor: int, handle: object, deadline: float) -> _Link:
        opened = handle.open_channel.options(concurrency_group=CONTROL_GROUP).remote(self.secret, self.node_ip, self.device.type)
        address = ray.get(opened, timeout=max(0.0, deadline - time.monotonic()))
        logger.debug("collective transport: %s channel to %s", address.data_backend, self.actors[actor].description)
        return _Link(handle, join_channel(address, self.secret, self.node_ip, self.device))

    def _post(self, link: _Link, batch: ExpertBatch) -> int:
        link.send(batch)
        return batch.tag

    def _take(self, link: _Link, tag: int, deadline: float) -> ExpertReply:
        return link.wait(tag, deadline)
