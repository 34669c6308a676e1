"""The expert actor's side of the ``collective`` transport: a thread per channel that answers each batch.

``open_channel`` (a Ray call in the actor's control group) starts a rendezvous store on an ephemeral
port and a thread that joins the channel as rank 1 once the coordinator joins as rank 0, checks the
coordinator's secret, and from then on runs every batch it receives and sends the reply back. The
thread ends when the coordinator closes the channel or dies (gloo fails the pending receive).

The store listens on 127.0.0.1 when the coordinator is on this actor's node and on the node's
address otherwise, never on all interfaces.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from moeshard.actors.collective.channel import ACTOR_RANK, ChannelAddress, ChannelClosed, TensorChannel
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)

JOIN_TIMEOUT = timedelta(seconds=60)  # the coordinator joins right after open_channel returns


def open_channel(
    host: str, secret: bytes, device: torch.device, coordinator_device: str, handle: Callable[[ExpertBatch], ExpertReply]
) -> ChannelAddress:
    """Listen for one coordinator on ``host``; its batches are answered with ``handle`` on a thread of their own."""
    both_cuda = device.type == "cuda" and coordinator_device == "cuda"
    store = dist.TCPStore(host, 0, 2, True, wait_for_workers=False, timeout=JOIN_TIMEOUT)
    address = ChannelAddress(host, store.port, uuid.uuid4().hex, "nccl" if both_cuda else "gloo")
    thread = threading.Thread(target=_serve, args=(store, address, secret, device, handle), name="expert-channel", daemon=True)
    thread.start()
    return address


def _serve(store: dist.TCPStore, address: ChannelAddress, secret: bytes, device: torch.device, handle) -> None:
    channel = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's NCCL operations run on the actor's GPU
        channel = TensorChannel.open(store, ACTOR_RANK, address.host, address, device)
        if not channel.check_secret([secret], JOIN_TIMEOUT):
            logger.warning("expert channel: a peer without the secret was refused")
            return
        while True:
            batch = channel.recv_batch()
            channel.send_reply(handle(batch), batch.rows.shape[0])
    except ChannelClosed as exc:  # the coordinator closed the channel or went away
        logger.debug("expert channel ended: %s", exc)
    except Exception as exc:  # the coordinator never joined, or a batch could not be run: the channel closes
        logger.warning("expert channel failed: %s", one_line(exc))
    finally:
        if channel is not None:
            channel.close()
