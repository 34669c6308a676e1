"""The bare cost of one layer's round trip to the expert actors: Ray actor calls against the socket frames (not a test).

    python -m moeshard.actors.benchmarks.round_trip [--actors 2] [--bytes 3000] [--rounds 300]

``--actors`` Ray actors each echo a message of ``--bytes`` bytes (its first 100 bytes back), reached two
ways in turn, ``--rounds`` times after a warm-up: a Ray actor call to every actor then ``ray.get`` of all
(the ``actor_calls`` transport's path), and a frame to every actor over its ``ExpertSocketServer``
connection then every reply (the ``socket`` transport's path). No expert compute: the transport alone.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import ray

from moeshard.actors.ray_init import init_ray
from moeshard.actors.socket.server import SECRET_BYTES, ExpertSocketServer, tuned, write_frame
from moeshard.actors.socket.transport import _Connection


class Echo:
    def __init__(self):
        self._server = None

    def run(self, message: bytes) -> bytes:
        return message[:100]

    def open_socket(self, secret: bytes) -> tuple[str, int]:
        if self._server is None:
            self._server = ExpertSocketServer("127.0.0.1", self.run)
        self._server.allow(secret)
        return self._server.address


def _timed(round_trip, rounds: int) -> float:
    """Median milliseconds per round, after ``rounds // 5`` rounds of warm-up."""
    for _ in range(max(1, rounds // 5)):
        round_trip()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        round_trip()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.round_trip", description=__doc__.split("\n")[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument(
        "--bytes", type=int, default=3000, help="message size (default 3000: one decode row of hidden 576, with its header)"
    )
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    init_ray(num_cpus=args.actors + 1, include_dashboard=False, logging_level="ERROR")
    try:
        actors = [ray.remote(num_cpus=1)(Echo).remote() for _ in range(args.actors)]
        message = b"x" * args.bytes
        actor_calls = _timed(lambda: ray.get([a.run.remote(message) for a in actors]), args.rounds)
        secret = b"k" * SECRET_BYTES
        connections = []
        for address in ray.get([a.open_socket.remote(secret) for a in actors]):
            sock = tuned(socket.create_connection(tuple(address), timeout=30))
            write_frame(sock, 0, secret)
            connections.append(_Connection(None, sock))

        def frames() -> None:
            seqs = [c.send(message) for c in connections]
            deadline = time.monotonic() + 60
            for c, seq in zip(connections, seqs):
                c.wait(seq, deadline)

        sockets = _timed(frames, args.rounds)
        for c in connections:
            c.close()
    finally:
        ray.shutdown()
    print("| path | actors | message bytes | round trip p50 (ms) |\n|---|---:|---:|---:|")
    print(f"| Ray actor calls | {args.actors} | {args.bytes} | {actor_calls:.3f} |")
    print(f"| socket frames | {args.actors} | {args.bytes} | {sockets:.3f} |")
    print(f"actor calls / sockets: {actor_calls / sockets:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
