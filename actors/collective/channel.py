"""One coordinator-actor pair's tensor channel: a two-rank torch.distributed process group.

Rank 0 is the coordinator, rank 1 the expert actor. Each MoE layer the coordinator sends a batch and
the actor sends back a reply, as tensors that go straight from one process's memory to the other's:

    coordinator -> actor   header [8] int64 (tag, layer, version, n, K, D, rows dtype, 0)   on ``meta``
                           rows [n, D], local_ids [n, K] int32, weights [n, K] float32       on ``data``
    actor -> coordinator   header [4] int64 (tag, stale, n, D)                               on ``meta``
                           rows [n, D] float32 (zeros when stale)                            on ``data``

``meta`` is always a gloo group on host tensors (the sizes a receiver needs before it can post a
receive, read without a device sync). ``data`` is an NCCL group when both ends are on CUDA devices,
so rows never leave the GPUs; otherwise it is ``meta`` itself and the tensors are host tensors.
Sends and receives on one (group, peer, tag) are matched in the order they were posted.

A channel opens with the coordinator's secret (``SECRET_BYTES`` uint8 on ``meta``), which the actor
compares in constant time before it runs anything. A peer that dies closes the gloo connection and
every pending operation on either side fails at once; a receive that times out closes it too, so a
late reply can never be read as another's. Dropping the last reference to a channel closes it.

Dimensions: n rows, D hidden, K chosen per token.
"""

from __future__ import annotations

import functools
import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moeshard.actors.wire import ExpertBatch, ExpertReply

logger = logging.getLogger(__name__)

COORDINATOR_RANK, ACTOR_RANK = 0, 1
SECRET_BYTES = 32
META_TAG, DATA_TAG = 0, 1
# Operations wait this long by default: an idle channel waits for the next layer as long as it likes; the
# coordinator's receives pass the dispatch deadline instead.
IDLE_TIMEOUT = timedelta(days=365)
_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BATCH_HEADER, _REPLY_HEADER = 8, 4


class ChannelClosed(ConnectionError):
    """The peer closed the channel or died (the channel is unusable from then on)."""


class ChannelTimeout(ChannelClosed, TimeoutError):
    """No answer in time; the timed-out receive closed the channel."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where a channel's rendezvous store listens, and what its groups are named there."""

    host: str
    port: int
    prefix: str
    data_backend: str  # "nccl" (both ends on CUDA) or "gloo"


_DEVICES: dict[str, object] = {}  # host -> the gloo device (one event loop thread) every channel of this process shares


def gloo_group(store: dist.Store, rank: int, host: str) -> dist.ProcessGroup:
    """A two-rank gloo group whose connections use ``host``'s interface (127.0.0.1 on one node)."""
    if host not in _DEVICES:
        _DEVICES[host] = dist.ProcessGroupGloo.create_device(hostname=host)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [_DEVICES[host]]
    options._timeout = IDLE_TIMEOUT
    return dist.ProcessGroupGloo(store, rank, 2, options)


def nccl_group(store: dist.Store, rank: int) -> dist.ProcessGroup:
    """A two-rank NCCL group on this process's current CUDA device (not yet run on a GPU: docs/gpu.md)."""
    return dist.ProcessGroupNCCL(store, rank, 2)


def _as_channel_errors(operation):
    """gloo's errors as the channel's: posting on a pair the peer already reset fails at once, as does waiting on one
    ("Connection closed by peer", "Read error ... Connection reset by peer", "Timed out waiting ...")."""

    @functools.wraps(operation)
    def guarded(*args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except RuntimeError as exc:
            message = str(exc).splitlines()[0]
            raise (ChannelTimeout if "Timed out" in message else ChannelClosed)(message) from exc

    return guarded


class TensorChannel:
    """Batches and replies as tensors over a pair of ranks; ``device`` is where ``data`` tensors must live."""

    def __init__(self, meta: dist.ProcessGroup, data: dist.ProcessGroup, rank: int, device: torch.device, store: dist.Store):
        self.meta, self.data, self.device = meta, data, device
        self.peer = ACTOR_RANK if rank == COORDINATOR_RANK else COORDINATOR_RANK
        self.store = store  # kept alive with the groups (the actor's end hosts it)

    @classmethod
    def open(cls, store: dist.Store, rank: int, host: str, address: ChannelAddress, device: torch.device) -> "TensorChannel":
        meta = gloo_group(dist.PrefixStore(f"{address.prefix}/meta", store), rank, host)
        if address.data_backend == "nccl":
            return cls(meta, nccl_group(dist.PrefixStore(f"{address.prefix}/data", store), rank), rank, device, store)
        return cls(meta, meta, rank, torch.device("cpu"), store)

    # -- the handshake ------------------------------------------------------------------
    @_as_channel_errors
    def send_secret(self, secret: bytes) -> None:
        self._wait(self.meta.send([torch.frombuffer(bytearray(secret), dtype=torch.uint8)], self.peer, META_TAG), None)

    @_as_channel_errors
    def check_secret(self, secrets: list[bytes], timeout: timedelta) -> bool:
        got = torch.empty(SECRET_BYTES, dtype=torch.uint8)
        self._wait(self.meta.recv([got], self.peer, META_TAG), timeout)
        sent = bytes(got.tolist())
        return any(hmac.compare_digest(sent, known) for known in secrets)

    # -- coordinator -> actor -----------------------------------------------------------
    @_as_channel_errors
    def send_batch(self, batch: ExpertBatch) -> list[dist.Work]:
        """Post the batch's sends; the caller keeps the returned works (and so the tensors) until they complete."""
        n, k = batch.local_ids.shape
        header = torch.tensor(
            [batch.tag, batch.layer, batch.version, n, k, batch.rows.shape[1], _ROW_DTYPES.index(batch.rows.dtype), 0]
        )
        works = [self.meta.send([header], self.peer, META_TAG)]
        for tensor in (batch.rows, batch.local_ids, batch.weights):
            works.append(self.data.send([tensor.to(self.device).contiguous()], self.peer, DATA_TAG))
        return works

    @_as_channel_errors
    def recv_batch(self) -> ExpertBatch:
        """The next batch (blocks until one comes; raises ``ChannelClosed`` when the coordinator goes away)."""
        header = torch.empty(_BATCH_HEADER, dtype=torch.int64)
        self._wait(self.meta.recv([header], self.peer, META_TAG), None)
        tag, layer, version, n, k, d, dtype, _ = header.tolist()
        rows = torch.empty(n, d, dtype=_ROW_DTYPES[dtype], device=self.device)
        local_ids = torch.empty(n, k, dtype=torch.int32, device=self.device)
        weights = torch.empty(n, k, dtype=torch.float32, device=self.device)
        for work in [self.data.recv([tensor], self.peer, DATA_TAG) for tensor in (rows, local_ids, weights)]:
            self._wait(work, None)  # all three posted at once: one wake-up, not three in a row
        return ExpertBatch(layer, tag, rows, local_ids, weights, version)

    # -- actor -> coordinator -----------------------------------------------------------
    @_as_channel_errors
    def send_reply(self, reply: ExpertReply, num_rows: int) -> None:
        """The reply to a batch of ``num_rows`` rows: always that many rows (zeros when stale), so the coordinator
        can post its receive for them before the header arrives."""
        d = reply.rows.shape[1]
        rows = torch.zeros(num_rows, d, device=self.device) if reply.stale else reply.rows.to(self.device, torch.float32)
        header = torch.tensor([reply.tag, int(reply.stale), num_rows, d])
        works = [self.meta.send([header], self.peer, META_TAG), self.data.send([rows.contiguous()], self.peer, DATA_TAG)]
        for work in works:
            self._wait(work, None)

    @_as_channel_errors
    def recv_reply(self, num_rows: int, hidden: int, timeout: timedelta) -> ExpertReply:
        """The reply to the oldest batch still unanswered, of ``num_rows`` rows of ``hidden``; both receives posted
        at once (on a GPU the rows' receive is queued on the device before the header is read)."""
        header = torch.empty(_REPLY_HEADER, dtype=torch.int64)
        rows = torch.empty(num_rows, hidden, dtype=torch.float32, device=self.device)
        works = [self.meta.recv([header], self.peer, META_TAG), self.data.recv([rows], self.peer, DATA_TAG)]
        for work in works:
            self._wait(work, timeout)
        tag, stale, n, d = header.tolist()
        if (n, d) != (num_rows, hidden):
            raise ChannelClosed(f"a reply of {n} x {d} rows for a batch of {num_rows} x {hidden}")
        return ExpertReply(tag, rows[:0] if stale else rows, stale=bool(stale))

    def close(self) -> None:
        """Drop the groups: the last reference gone, gloo closes the connections and the peer's pending operations fail."""
        self.meta = self.data = self.store = None

    @staticmethod
    def _wait(work: dist.Work, timeout: timedelta | None) -> None:
        work.wait() if timeout is None else work.wait(max(timeout, timedelta(milliseconds=1)))
