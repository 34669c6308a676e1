"""The socket transport's framing, without Ray: the secret, ordering by sequence number, large frames both ways.

The transport over real expert actors (outputs equal to the single process, SIGKILLed and stuck actors)
runs in test_cluster.py and test_failover.py, where it is the default.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from moeshard.actors.socket.server import FRAME, SECRET_BYTES, ExpertSocketServer, read_frame, tuned, write_frame
from moeshard.actors.socket.transport import DispatchTimeout, _Connection

SECRET = b"s" * SECRET_BYTES


def _server(handle) -> ExpertSocketServer:
    server = ExpertSocketServer("127.0.0.1", handle)
    server.allow(SECRET)
    return server


def _connect(server: ExpertSocketServer, secret: bytes = SECRET) -> socket.socket:
    sock = tuned(socket.create_connection(server.address, timeout=10))
    write_frame(sock, 0, secret)
    return sock


def test_the_listener_is_on_loopback_only():
    server = _server(lambda payload: payload)
    assert server.address[0] == "127.0.0.1"


@pytest.mark.parametrize("secret", [b"x" * SECRET_BYTES, b"short", b""])
def test_a_connection_without_the_secret_is_closed_and_runs_nothing(secret):
    calls = []
    server = _server(lambda payload: calls.append(payload) or payload)
    sock = _connect(server, secret)
    sock.settimeout(10)
    try:
        write_frame(sock, 1, b"work")
        answer = sock.recv(FRAME.size)
    except (ConnectionResetError, BrokenPipeError):  # closed with our frames unread, perhaps before this one was written
        answer = b""
    assert answer == b""  # closed by the server, no reply
    assert calls == []


def test_frames_are_answered_by_sequence_number_and_large_ones_do_not_deadlock():
    server = _server(lambda payload: payload[::-1])
    connection = _Connection(handle=None, sock=_connect(server))
    big = bytes(range(256)) * (12 * 2**20 // 256)  # 12 MB each way: more than the sockets buffer
    seqs = [connection.send(big), connection.send(b"abc"), connection.send(big[: 2**20])]  # all sent before any is read
    deadline = time.monotonic() + 30
    assert connection.wait(seqs[1], deadline) == b"cba"  # taken out of order
    assert connection.wait(seqs[2], deadline) == big[: 2**20][::-1]
    assert connection.wait(seqs[0], deadline) == big[::-1]
    connection.close()


def test_a_forgotten_reply_is_dropped_whether_it_came_before_or_after():
    """The replies of an abandoned dispatch (a ping-pong pass that failed) are not kept for a wait that will not come."""
    release = threading.Event()
    server = _server(lambda payload: (release.wait(30) if payload == b"held" else True) and payload[::-1])
    connection = _Connection(handle=None, sock=_connect(server))
    arrived = connection.send(b"first")
    deadline = time.monotonic() + 30
    while arrived not in connection.replies and time.monotonic() < deadline:
        time.sleep(0.01)
    connection.forget(arrived)  # its reply is here: dropped now
    held = connection.send(b"held")
    connection.forget(held)  # its reply is not here yet: dropped as it comes
    release.set()
    last = connection.send(b"last")  # answered after "held" (one connection, one thread, in order)
    assert connection.wait(last, deadline) == b"tsal"
    assert connection.replies.filed == frozenset() and connection.replies.forgotten == frozenset()
    connection.close()


def test_a_silent_actor_times_out_and_a_dead_one_fails_at_once():
    release = threading.Event()
    server = _server(lambda payload: release.wait(30) and payload)
    connection = _Connection(handle=None, sock=_connect(server))
    seq = connection.send(b"slow")
    started = time.monotonic()
    with pytest.raises(DispatchTimeout):
        connection.wait(seq, time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - started < 5
    release.set()

    listener = socket.create_server(("127.0.0.1", 0))  # a peer that reads the secret and dies mid-request
    peer = tuned(socket.create_connection(listener.getsockname()[:2]))
    accepted, _ = listener.accept()
    dying = _Connection(handle=None, sock=peer)
    seq = dying.send(b"work")
    assert read_frame(accepted)[1] == b"work"
    accepted.close()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="lost"):
        dying.wait(seq, time.monotonic() + 30)
    assert time.monotonic() - started < 5
    connection.close()
