"""Benchmark of the expert-sharded data path (not a test): ``python -m moeshard.actors.benchmarks.dispatch``.

1. Dispatch round trip of one MoE layer (route -> plan -> permute by actor ->
   messages -> expert actors -> replies -> combine), timed inside a
   coordinator-like actor, per transport, at several token counts, next to:
   - echo: the same messages to actors that decode them and send the rows
     back unchanged (same reply bytes, no expert compute): the transport alone;
   - compute: the same layer's experts run in-process (``LocalExperts``);
   - shm floor: the same request and reply bytes of every actor through
     shared memory to as many worker processes and back (copy in, semaphore,
     copy out, each way), the least any multi-process transport must do.
   A breakdown splits the echo round trip into the coordinator's work before
   the exchange (plan, permute, encode), the exchange, the actors' wire work
   inside it (decode + encode, in-process) and the coordinator's work after
   it (decode, combine), and the cores the expert actors use while idle
   between layers (a compiled graph's actors poll their channels).
2. End-to-end decode throughput of ``LLM(expert_actors=4)`` over the
   single-process ``LLM`` on the same model and batch, per transport; the
   single process once with one torch thread (as each actor has: Ray sets
   OMP_NUM_THREADS=1 for a one-CPU actor) and once with all cores.

Everything runs in one process tree, one run: compare ratios, not seconds.

Dimensions: T tokens, D hidden, K chosen per token, A actors.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from multiprocessing import shared_memory

import ray
import torch

from moeshard.actors.collective.server import open_channel
from moeshard.actors.dispatch import remote_experts
from moeshard.actors.expert_actor import CONTROL_GROUP
from moeshard.actors.pool.expert_pool import start_expert_pool
from moeshard.actors.ray_init import init_ray
from moeshard.actors.socket.server import ExpertSocketServer
from moeshard.actors.transport import ActorRef
from moeshard.actors.wire import NO_WORK, ExpertBatch, ExpertReply
from moeshard.cluster.choices import TRANSPORTS
from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.llm import LLM
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.moe import LocalExperts
from moeshard.kernels import route

logger = logging.getLogger(__name__)


class EchoActor:
    """An expert actor without experts: decodes each message and sends its rows back (the reply size of real work)."""

    def __init__(self):
        self._socket_server: ExpertSocketServer | None = None

    def ready(self) -> bool:
        return True

    def run_experts(self, message: bytes) -> bytes:
        if message == NO_WORK:
            return NO_WORK
        return self.run_batch(ExpertBatch.decode(message)).encode()

    def run_batch(self, batch: ExpertBatch) -> ExpertReply:
        return ExpertReply(batch.tag, batch.rows.float())  # real actors reply in float32 (partial sums)

    def open_channel(self, secret: bytes, coordinator_ip: str, coordinator_device: str):
        """The collective transport's channel, as ``ExpertActor.open_channel`` (this benchmark runs on one node)."""
        return open_channel("127.0.0.1", secret, torch.device("cpu"), coordinator_device, self.run_batch)

    def open_socket(self, secret: bytes, coordinator_ip: str) -> tuple[str, int]:
        """The socket transport's listener, as ``ExpertActor.open_socket`` (this benchmark runs on one node)."""
        server = self._socket_server
        if server is None:
            server = self._socket_server = ExpertSocketServer("127.0.0.1", self.run_experts)
        server.allow(secret)
        return server.address


class _TimedTransport:
    """Wraps a transport; remembers when the last exchange started and ended, and its messages and replies."""

    def __init__(self, inner):
        self.inner = inner
        self.carries_device_tensors = inner.carries_device_tensors
        self.span = (0.0, 0.0)
        self.last: tuple[list, list] = ([], [])

    def exchange(self, messages: list[ExpertBatch | None], live: frozenset[int]):
        return self.receive(self.send(messages, live))

    def send(self, messages: list[ExpertBatch | None], live: frozenset[int]):
        self._start, self._messages = time.perf_counter(), messages
        return self.inner.send(messages, live)

    def receive(self, ticket):
        exchange = self.inner.receive(ticket)
        self.span = (self._start, time.perf_counter())
        self.last = (self._messages, exchange.replies)
        return exchange

    def close(self) -> None:
        self.inner.close()


class DispatchBench:
    """Times one MoE layer through the expert actors (or echo actors), the way the coordinator runs it."""

    def __init__(self, config: EngineConfig, placement, expert_actors: list[ActorRef], echo_actors: list[ActorRef]):
        model_config = ModelConfig.from_model_dir(config.model_dir)
        reader = CheckpointReader(config.model_dir, model_config)
        self.dtype = getattr(torch, config.dtype)
        self.k = model_config.experts_per_token
        self.router = reader.read_dense(self.dtype).layers[0].router  # [E, D]
        self.hidden_size = model_config.hidden_size
        self.local = LocalExperts.from_checkpoint(reader, self.dtype)
        self.remote = {
            "experts": remote_experts(config, placement, expert_actors),
            "echo": remote_experts(config, placement, echo_actors),
        }
        for experts in self.remote.values():
            experts.transport = _TimedTransport(experts.transport)

    def _inputs(self, num_tokens: int):
        generator = torch.Generator().manual_seed(num_tokens)
        hidden = torch.randn(num_tokens, self.hidden_size, generator=generator).to(self.dtype)  # [T, D]
        return hidden, route(hidden @ self.router.T, self.k)

    def time_layer(self, where: str, num_tokens: int, iterations: int) -> dict[str, list[float]]:
        """where: "experts" | "echo" (through the actors) or "local"; seconds per round trip and its parts."""
        experts = self.local if where == "local" else self.remote[where]
        hidden, routing = self._inputs(num_tokens)
        for _ in range(max(3, iterations // 10)):
            experts(0, hidden, routing)
        times: dict[str, list[float]] = {"total": [], "before": [], "exchange": [], "after": []}
        for _ in range(iterations):
            start = time.perf_counter()
            experts(0, hidden, routing)
            end = time.perf_counter()
            times["total"].append(end - start)
            if where != "local":
                sent, received = experts.transport.span
                times["before"].append(sent - start)
                times["exchange"].append(received - sent)
                times["after"].append(end - received)
        return times

    def message_sizes(self, num_tokens: int) -> list[tuple[int, int]]:
        """(request bytes, reply bytes) per actor with work, from one echo round trip, as the byte transports encode them."""
        experts = self.remote["echo"]
        experts(0, *self._inputs(num_tokens))
        messages, replies = experts.transport.last
        return [(len(m.encode()), len(r.encode())) for m, r in zip(messages, replies) if m is not None]

    def time_actor_wire(self, num_tokens: int, iterations: int) -> list[float]:
        """The echo actors' own work of one round trip (decode + encode of every message), in this process."""
        experts, echo = self.remote["echo"], EchoActor()
        experts(0, *self._inputs(num_tokens))
        messages = [m.encode() for m in experts.transport.last[0] if m is not None]
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            for message in messages:
                echo.run_experts(message)
            times.append(time.perf_counter() - start)
        return times

    def close(self, where: str) -> None:
        """Tear down the transport to the expert or echo actors (a compiled graph's actors poll while it lives)."""
        self.remote[where].transport.close()


# -- the shared-memory floor ----------------------------------------------------------------------


def _shm_peer(request_name: str, reply_name: str, sizes, go, done) -> None:
    """Worker process: wait, copy the request out of shared memory, copy a reply of the asked size in, signal."""
    request, reply = shared_memory.SharedMemory(request_name), shared_memory.SharedMemory(reply_name)
    payload = bytes(reply.size)
    while True:
        go.acquire()
        n_request, n_reply = sizes[0], sizes[1]
        if n_request < 0:
            break
        received = bytes(request.buf[:n_request])  # copy out
        reply.buf[:n_reply] = memoryview(payload)[:n_reply]  # copy in
        del received
        done.release()
    request.close()
    reply.close()


class ShmPingPong:
    """One worker process per actor; a round trip sends each its request bytes and takes back its reply bytes."""

    def __init__(self, num_peers: int, max_request: int, max_reply: int):
        ctx = mp.get_context("spawn")
        self.requests = [shared_memory.SharedMemory(create=True, size=max_request) for _ in range(num_peers)]
        self.replies = [shared_memory.SharedMemory(create=True, size=max_reply) for _ in range(num_peers)]
        self.sizes = [ctx.Array("q", 2, lock=False) for _ in range(num_peers)]
        self.go = [ctx.Semaphore(0) for _ in range(num_peers)]
        self.done = [ctx.Semaphore(0) for _ in range(num_peers)]
        self.source = bytes(max_request)
        self.peers = [
            ctx.Process(target=_shm_peer, args=(q.name, r.name, s, g, d), daemon=True)
            for q, r, s, g, d in zip(self.requests, self.replies, self.sizes, self.go, self.done)
        ]
        for peer in self.peers:
            peer.start()

    def round_trip(self, sizes: list[tuple[int, int]]) -> None:
        for i, (n_request, n_reply) in enumerate(sizes):
            self.requests[i].buf[:n_request] = memoryview(self.source)[:n_request]  # copy in
            self.sizes[i][0], self.sizes[i][1] = n_request, n_reply
            self.go[i].release()
        for i, (_, n_reply) in enumerate(sizes):
            self.done[i].acquire()
            bytes(self.replies[i].buf[:n_reply])  # copy out

    def time(self, sizes: list[tuple[int, int]], iterations: int) -> list[float]:
        for _ in range(max(3, iterations // 10)):
            self.round_trip(sizes)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.round_trip(sizes)
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        for sizes, go in zip(self.sizes, self.go):
            sizes[0] = -1
            go.release()
        for peer in self.peers:
            peer.join(timeout=10)
        for segment in self.requests + self.replies:
            segment.close()
            segment.unlink()


# -- the benchmarks -------------------------------------------------------------------------------


def _p50(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def _start_echo_actors(num_actors: int) -> list[ActorRef]:
    cls = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(EchoActor).options(num_cpus=1, max_restarts=0)
    actors = [ActorRef(i, cls.remote(), f"echo actor {i}") for i in range(num_actors)]
    ray.get([a.handle.ready.remote() for a in actors])
    return actors


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _idle_cores(pids: list[int], seconds: float = 2.0) -> float | None:
    """Cores the given processes use while no layer is being dispatched (None where /proc is unavailable)."""
    if not all(os.path.exists(f"/proc/{pid}/stat") for pid in pids):
        return None
    before = _cpu_seconds(pids)
    time.sleep(seconds)
    return (_cpu_seconds(pids) - before) / seconds


def _time_through_actors(bench, token_counts: list[int], iterations: int, pids: list[int]) -> dict:
    """Every token count through the expert actors, then through the echo actors; one transport live at a time."""
    timed: dict = {}
    for where in ("experts", "echo"):
        for tokens in token_counts:
            timed[where, tokens] = ray.get(bench.time_layer.remote(where, tokens, iterations))
        if where == "experts":
            timed["idle_cores"] = _idle_cores(pids)
        ray.get(bench.close.remote(where))
    return timed


def _row(transport: str, tokens: int, timed: dict, same: dict) -> dict:
    full, echo = timed["experts", tokens]["total"], timed["echo", tokens]
    return {
        "transport": transport,
        "tokens": tokens,
        "p50_ms": _p50(full),
        "p99_ms": _p99(full),
        "echo_p50_ms": _p50(echo["total"]),
        "echo_p99_ms": _p99(echo["total"]),
        "compute_p50_ms": _p50(same["compute", tokens]),
        "shm_floor_p50_ms": _p50(same["floor", tokens]),
        "echo_before_p50_ms": _p50(echo["before"]),
        "echo_exchange_p50_ms": _p50(echo["exchange"]),
        "echo_actor_wire_p50_ms": _p50(same["actor_wire", tokens]),
        "echo_after_p50_ms": _p50(echo["after"]),
    }


def bench_dispatch(model_dir: str, token_counts: list[int], iterations: int, num_actors: int) -> dict:
    base = EngineConfig(model_dir=model_dir, dtype="bfloat16", cluster={"expert_actors": num_actors})
    pool = start_expert_pool(base, ModelConfig.from_model_dir(model_dir))
    pids = [info["pid"] for info in ray.get([a.handle.info.remote() for a in pool.actors])]
    echo_actors = _start_echo_actors(num_actors)
    rows, idle = [], {}
    try:
        same: dict = {}  # what does not depend on the transport, measured once, with no compiled graph live
        for transport in TRANSPORTS:
            cluster = base.cluster.model_copy(update={"transport": transport})
            config = base.model_copy(update={"cluster": cluster})
            bench_cls = ray.remote(DispatchBench).options(num_cpus=1)
            bench = bench_cls.remote(config, pool.placement, pool.actors, echo_actors)
            if not same:
                for tokens in token_counts:
                    same["compute", tokens] = ray.get(bench.time_layer.remote("local", tokens, iterations))["total"]
                    same["actor_wire", tokens] = ray.get(bench.time_actor_wire.remote(tokens, iterations))
                sizes = {t: ray.get(bench.message_sizes.remote(t)) for t in token_counts}
                same.update({("floor", t): times for t, times in _time_floors(sizes, iterations).items()})
            timed = _time_through_actors(bench, token_counts, iterations, pids)
            idle[transport] = timed["idle_cores"]
            rows.extend(_row(transport, tokens, timed, same) for tokens in token_counts)
            ray.kill(bench)
    finally:
        for actor in echo_actors:
            ray.kill(actor.handle)
        pool.shutdown()
    return {"rows": rows, "expert_actors_idle_cores": idle}


def _time_floors(sizes: dict[int, list[tuple[int, int]]], iterations: int) -> dict[int, list[float]]:
    peers = max(len(s) for s in sizes.values())
    max_request = max(n for s in sizes.values() for n, _ in s)
    max_reply = max(n for s in sizes.values() for _, n in s)
    pingpong = ShmPingPong(peers, max_request, max_reply)
    try:
        return {tokens: pingpong.time(s, iterations) for tokens, s in sizes.items()}
    finally:
        pingpong.close()


def bench_decode(model_dir: str, batch: int, prompt_len: int, new_tokens: int, num_actors: int) -> list[dict]:
    """tokens/s of one process (with one torch thread, and with all cores) and of the cluster per transport."""
    prompts = [[1 + (p * 31 + i * 7) % 500 for i in range(prompt_len)] for p in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    cores = os.cpu_count() or 1
    setups = [("single process, 1 thread", 0, "actor_calls", 1)]
    setups += [(f"single process, {cores} threads", 0, "actor_calls", cores)]
    setups += [(f"{num_actors} actors, {t}", num_actors, t, None) for t in TRANSPORTS]
    results, threads = [], torch.get_num_threads()
    for name, actors, transport, num_threads in setups:
        torch.set_num_threads(num_threads or threads)  # each actor has one thread: Ray sets OMP_NUM_THREADS=1
        with LLM(model_dir, expert_actors=actors, dtype="bfloat16", cluster={"transport": transport}) as llm:
            llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm up
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outputs)
        results.append({"setup": name, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed})
    torch.set_num_threads(threads)
    for row in results:
        row["vs_single_process_1_thread"] = row["tokens_per_s"] / results[0]["tokens_per_s"]
        row["vs_single_process_all_cores"] = row["tokens_per_s"] / results[1]["tokens_per_s"]
        ratios = f"{row['vs_single_process_1_thread']:5.2f} | {row['vs_single_process_all_cores']:5.2f}"
        print(f"| {row['setup']:<26} | {row['tokens_per_s']:8.1f} | {ratios} |", flush=True)
    return results


DISPATCH_COLUMNS = ("p50_ms", "p99_ms", "echo_p50_ms", "echo_p99_ms", "compute_p50_ms", "shm_floor_p50_ms")
BREAKDOWN_COLUMNS = tuple(
    f"echo_{part}p50_ms" for part in ("", "before_", "exchange_", "actor_wire_", "after_")
) + ("shm_floor_p50_ms",)


def _table_row(r: dict, columns: tuple[str, ...]) -> str:
    cells = [f"{r[c]:7.3f}" if c.startswith("shm") else f"{r[c]:7.2f}" for c in columns]
    return f"| {r['transport']:<14} | {r['tokens']:>4} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moeshard.actors.benchmarks.dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256], help="tokens per MoE layer")
    parser.add_argument("--iterations", type=int, default=50, help="timed round trips per point")
    parser.add_argument("--actors", type=int, default=4, help="expert actors")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size of the dispatch benchmark")
    parser.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--skip-decode", action="store_true", help="only the dispatch round trip")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moeshard.cluster.engine.assembly").setLevel(logging.ERROR)  # "no tokenizer": prompts are token ids

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="moeshard-bench-"))
    init_ray(num_cpus=2 * args.actors + 2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        layer_model = write_synthetic_mixtral(
            f"{tmp}/layer", hidden_size=args.hidden, intermediate_size=512, num_layers=1, num_heads=32, num_kv_heads=8
        )
        results["dispatch"] = bench_dispatch(str(layer_model), args.tokens, args.iterations, args.actors)
        _print_dispatch(results["dispatch"], args)
        if not args.skip_decode:
            decode_model = write_synthetic_mixtral(
                f"{tmp}/decode", hidden_size=1024, intermediate_size=3584, num_layers=4, num_heads=8, num_kv_heads=2
            )
            print(
                f"\nDecode: {args.decode_batch} prompts x 16 tokens, {args.decode_tokens} greedy tokens each "
                "(ignore_eos), hidden 1024, intermediate 3584, 4 layers, top-2 of 8 experts, bf16"
            )
            cores = os.cpu_count() or 1
            print(f"| setup                      | tokens/s | vs 1 process, 1 thread | vs 1 process, {cores} threads |")
            print("|---|---:|---:|---:|")
            results["decode"] = bench_decode(
                str(decode_model), args.decode_batch, 16, args.decode_tokens, num_actors=args.actors
            )
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def _print_dispatch(dispatch: dict, args: argparse.Namespace) -> None:
    print(f"\nOne MoE layer: hidden {args.hidden} bf16, intermediate 512, top-2 of 8, {args.actors} actors (ms)")
    print("| transport      |    T |     p50 |     p99 | echo p50 | echo p99 | compute p50 | shm floor p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in dispatch["rows"]:
        print(_table_row(row, DISPATCH_COLUMNS))
    print("\nWhere the echo round trip goes (p50 of each part, ms): before = plan, permute, encode;")
    print("actors' wire = their decode + encode, part of the exchange; after = decode, combine")
    print("| transport      |    T |    echo |  before | exchange | actors' wire |   after | shm floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in dispatch["rows"]:
        print(_table_row(row, BREAKDOWN_COLUMNS))
    idle = dispatch["expert_actors_idle_cores"]
    if all(cores is not None for cores in idle.values()):
        used = ", ".join(f"{transport} {cores:.2f}" for transport, cores in idle.items())
        print(f"\nCPU cores the {args.actors} expert actors use while idle between layers: {used}")


if __name__ == "__main__":
    main()
