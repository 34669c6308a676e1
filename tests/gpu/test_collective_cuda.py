"""The collective transport's channel between two GPUs: the rows cross over NCCL and stay on the devices.

No Ray: the actor's end runs in a child process on the second GPU (NCCL needs one device per rank).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

from moeshard.actors.collective.link import ChannelLink, join_channel
from moeshard.actors.collective.server import open_channel
from moeshard.actors.wire import ExpertBatch, ExpertReply

SECRET = b"g" * 32


def _actor(conn) -> None:
    device = torch.device("cuda:1")
    torch.cuda.set_device(device)

    def handle(batch: ExpertBatch) -> ExpertReply:
        assert batch.rows.device == device and batch.local_ids.device == device
        return ExpertReply(batch.tag, batch.rows.float() * 2 + batch.weights.sum(1, keepdim=True))

    conn.send(open_channel("127.0.0.1", SECRET, device, "cuda", handle))
    threading.Event().wait(120)


def test_rows_cross_between_gpus_over_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL puts each rank on its own device")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_actor, args=(child,), daemon=True)
    process.start()
    try:
        address = parent.recv()
        assert address.data_backend == "nccl"
        device = torch.device("cuda:0")
        torch.cuda.set_device(device)
        link = ChannelLink(None, join_channel(address, SECRET, "127.0.0.1", device))
        g = torch.Generator(device=device).manual_seed(0)
        rows = torch.randn(37, 256, generator=g, device=device).bfloat16()
        weights = torch.rand(37, 2, generator=g, device=device)
        local_ids = torch.zeros(37, 2, dtype=torch.int32, device=device)
        link.send(ExpertBatch(0, 5, rows, local_ids, weights, 1))
        reply = link.wait(5, time.monotonic() + 60)
        assert reply.rows.device == device and reply.rows.dtype == torch.float32
        assert torch.equal(reply.rows, rows.float() * 2 + weights.sum(1, keepdim=True))
    finally:
        process.kill()
