"""The ``socket`` transport: each layer's messages as frames over one TCP connection per expert actor.

The data path leaves Ray: the coordinator asks each actor once, through Ray, for its listener's address
(``ExpertActor.open_socket``, with a secret of this transport's), connects, and from then on every MoE
layer is one frame to each actor with work and one reply frame back (``socket/server.py``). A thread per
connection files the replies by sequence number, so a large reply never waits for the coordinator to
finish sending, and two layers can be in flight at once (ping-pong micro-batches).

Failures look as they do with actor calls: an actor that dies closes its connection (its reply, and any
later one, fails at once); one that does not answer by the dispatch deadline fails with ``DispatchTimeout``
and its connection is dropped, so a late reply is never read. The dispatch marks the actor down; once Ray
has it back (the health probe is a Ray call) the next send connects again, to the restarted process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import ray

from moeshard.actors.expert_actor import CONTROL_GROUP
from moeshard.actors.filed_replies import FiledReplies
from moeshard.actors.socket.server import SECRET_BYTES, FrameError, read_frame, tuned, write_frame
from moeshard.actors.transport import ActorRef, LinkTransport
from moeshard.actors.wire import ExpertBatch, ExpertReply

logger = logging.getLogger(__name__)


class DispatchTimeout(TimeoutError):
    """An expert actor did not answer a layer's frame by the dispatch deadline."""


class _Connection:
    """One socket to one expert actor (the process behind ``handle`` when it connected)."""

    def __init__(self, handle: object, sock: socket.socket):
        self.handle = handle
        self.sock = sock
        self.replies: FiledReplies[bytes] = FiledReplies()  # by sequence number
        self.error: BaseException | None = None  # set once the connection is unusable
        self._changed = threading.Condition()
        self._next_seq = 1  # 0 is the secret's frame
        threading.Thread(target=self._read_replies, name="expert-socket-replies", daemon=True).start()

    def send(self, payload: bytes) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        write_frame(self.sock, seq, payload)
        return seq

    def wait(self, seq: int, deadline: float) -> bytes:
        with self._changed:
            self._changed.wait_for(lambda: seq in self.replies or self.error is not None, max(0.0, deadline - time.monotonic()))
            if seq in self.replies:
                return self.replies.take(seq)
            if self.error is not None:
                raise ConnectionError(f"the connection to the expert actor was lost: {self.error}") from self.error
        raise DispatchTimeout("no reply by the dispatch deadline")

    def forget(self, seq: int) -> None:
        """No one will wait for the reply to ``seq``: dropped if it is here, else as it arrives."""
        with self._changed:
            self.replies.forget(seq)

    def _read_replies(self) -> None:
        try:
            while True:
                seq, payload = read_frame(self.sock)
                with self._changed:
                    if self.replies.file(seq, payload):
                        self._changed.notify_all()
        except (FrameError, OSError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._changed:
            self.error = self.error or exc
            self._changed.notify_all()

    def close(self) -> None:
        self._fail(ConnectionAbortedError("closed by the coordinator"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class SocketTransport(LinkTransport):
    def __init__(self, actors: list[ActorRef], timeout_s: float):
        super().__init__(actors, timeout_s, SECRET_BYTES)

    def _open(self, actor: int, handle: object, deadline: float) -> _Connection:
        address = ray.get(handle.open_socket.options(concurrency_group=CONTROL_GROUP).remote(self.secret, self.node_ip),
                          timeout=max(0.0, deadline - time.monotonic()))  # fmt: skip
        sock = tuned(socket.create_connection(tuple(address), timeout=max(0.1, deadline - time.monotonic())))
        sock.settimeout(None)  # replies are waited for by deadline, on the reader's condition
        write_frame(sock, 0, self.secret)
        logger.debug("socket transport: connected to %s at %s:%d", self.actors[actor].description, *address)
        return _Connection(handle, sock)

    def _post(self, link: _Connection, batch: ExpertBatch) -> int:
        return link.send(batch.encode())

    def _take(self, link: _Connection, seq: int, deadline: float) -> ExpertReply:
        return ExpertReply.decode(link.wait(seq, deadline))
