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
import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from moeshard.actors.collective.channel import SECRET_BYTES, ChannelClosed
from moeshard.actors.collective.link import ChannelLink, join_channel
from moeshard.actors.expert_actor import CONTROL_GROUP
from moeshard.actors.transport import ActorRef, LinkTransport
from moeshard.actors.wire import ExpertBatch, ExpertReply

logger = logging.getLogger(__name__)


class CollectiveTransport(LinkTransport):
    carries_device_tensors = True  # NCCL between GPUs; gloo moves host copies
    open_errors = (RayActorError, GetTimeoutError, ChannelClosed, RuntimeError)  # RuntimeError: the store or a group did not form

    def __init__(self, actors: list[ActorRef], timeout_s: float, device: torch.device = torch.device("cpu")):
        super().__init__(actors, timeout_s, SECRET_BYTES)
        self.device = device  # the coordinator's: NCCL carries the rows when it and the actor are on CUDA

    def _open(self, actor: int, handle: object, deadline: float) -> ChannelLink:
        opened = handle.open_channel.options(concurrency_group=CONTROL_GROUP).remote(self.secret, self.node_ip, self.device.type)
        address = ray.get(opened, timeout=max(0.0, deadline - time.monotonic()))
        logger.debug("collective transport: %s channel to %s", address.data_backend, self.actors[actor].description)
        return ChannelLink(handle, join_channel(address, self.secret, self.node_ip, self.device))

    def _post(self, link: ChannelLink, batch: ExpertBatch) -> int:
        link.send(batch)
        return batch.tag

    def _take(self, link: ChannelLink, tag: int, deadline: float) -> ExpertReply:
        return link.wait(tag, deadline)
