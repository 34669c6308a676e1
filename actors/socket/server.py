"""The expert actor's side of the ``socket`` transport: a TCP listener that runs each framed request it is sent.

A round trip of Ray actor calls to two actors costs 1.86 ms on a two-core machine, against 0.24 ms for
the same bytes as frames over TCP (``actors/benchmarks/round_trip.py``, docs/cluster.md); with 2 calls
per MoE layer and 30 layers per token that is most of a batch-1 decode step. So the expert actor also listens on a socket and runs ``run_experts`` on the
frames that arrive there, on a thread per connection, while Ray keeps the control path (placement,
staging, health, restarts).

Framing (``FRAME``): each frame is a header of two little-endian u64, (sequence number, payload length),
then the payload. A connection starts with one frame whose payload is the secret the coordinator
registered with ``open_socket`` (compared in constant time; anything else closes the connection). Each
request frame is answered by one reply frame with the same sequence number, in order.

The listener binds 127.0.0.1 when the coordinator is on this actor's node and the node's address
otherwise (``ray.util.get_node_ip_address``), never all interfaces.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<QQ")  # (sequence number, payload length)
SECRET_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0


class FrameError(ConnectionError):
    """The peer closed the connection, or sent something that is not a frame."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise FrameError("connection closed")
        got += chunk
    return buf


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    seq, length = FRAME.unpack(recv_exact(sock, FRAME.size))
    return seq, bytes(recv_exact(sock, length))


def write_frame(sock: socket.socket, seq: int, payload: bytes) -> None:
    header = FRAME.pack(seq, len(payload))
    if len(payload) < 65536:
        sock.sendall(header + payload)
    else:  # no copy of a large payload just to put 16 bytes before it
        sock.sendall(header)
        sock.sendall(payload)


def tuned(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is a whole message: send it now
    return sock


class ExpertSocketServer:
    """Listens on ``host``; every authenticated connection gets a thread that answers each frame with ``handle``."""

    def __init__(self, host: str, handle: Callable[[bytes], bytes]):
        self.handle = handle
        self.secrets: set[bytes] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.address = self._listener.getsockname()[:2]  # (host, port)
        threading.Thread(target=self._accept, name=f"expert-socket-{host}", daemon=True).start()

    def allow(self, secret: bytes) -> None:
        with self._lock:
            self.secrets.add(secret)

    def _accept(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            threading.Thread(target=self._serve, args=(tuned(conn),), name="expert-socket-conn", daemon=True).start()

    def _authentic(self, secret: bytes) -> bool:
        with self._lock:
            secrets = list(self.secrets)
        return any(hmac.compare_digest(secret, known) for known in secrets)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)  # a peer that connects and says nothing does not keep a thread
                _, secret = read_frame(conn) if _header_fits(conn) else (0, b"")
                if not self._authentic(secret):
                    logger.warning("expert socket: a connection without the secret was closed")
                    return
                conn.settimeout(None)  # between layers the coordinator may be idle for as long as it likes
                while True:
                    seq, payload = read_frame(conn)
                    write_frame(conn, seq, self.handle(payload))
            except (FrameError, OSError) as exc:  # the coordinator went away, or closed after a timeout
                logger.debug("expert socket connection ended: %s", exc)


def _header_fits(conn: socket.socket) -> bool:
    """The first frame must be a secret: peek at its header and refuse a length that is not one."""
    header = conn.recv(FRAME.size, socket.MSG_PEEK | socket.MSG_WAITALL)
    return len(header) == FRAME.size and FRAME.unpack(header)[1] == SECRET_BYTES
