"""The expert actor: hosts some experts of every MoE layer and runs them on the rows it is sent.

It reads only its own experts from the checkpoint (by key, on its own node).
Ray restarts it after a crash; ``__init__`` then reloads the experts it started
with, and the coordinator's probe (``adopt``) brings it to the current placement.

Stacks are kept per placement version, and every batch names its version, so a
rebalance loads the next version's experts beside the current ones (``stage``,
on its own thread: ``run_experts`` keeps serving), the coordinator switches its
tables between two steps, and ``retire`` drops what no version in use needs.
A batch for a version this actor does not hold (it restarted since) is answered
``stale``, never computed with the wrong stacks.

Dimensions: n rows sent here, D hidden, K chosen per token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

from moeshard.actors.collective.channel import ChannelAddress
from moeshard.actors.collective.server import open_channel
from moeshard.actors.socket.server import ExpertSocketServer
from moeshard.actors.wire import NO_WORK, ExpertBatch, ExpertReply
from moeshard.cluster.model.checkpoint import CheckpointReader, ExpertKey, expert_weight_shapes
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.device import resolve_device, resolve_dtype
from moeshard.cluster.model.moe import ExpertStack, held_bytes, load_expert_stacks, stack_experts, warm_up_stacks
from moeshard.kernels.batch_invariance import batch_invariant

logger = logging.getLogger(__name__)

CONTROL_GROUP = "control"  # the concurrency group of stage/retire: one thread beside the one that runs experts


@dataclass(frozen=True)
class StageReport:
    actor: int
    version: int
    bytes_loaded: int  # expert weights read from the checkpoint for this version
    weight_bytes: int  # every expert weight held once the version is staged (all versions)
    seconds: float


class ExpertActor:
    def __init__(
        self,
        actor_index: int,
        model_dir: str,
        dtype: str,
        hosted: dict[int, list[int]],
        version: int = 0,
        shares: dict[int, dict[int, float]] | None = None,
        quantization: str = "none",
        batch_invariant: bool = False,
    ):
        self.actor_index = actor_index
        self.quantization = quantization
        self.batch_invariant = batch_invariant  # products on fixed row tiles (kernels/batch_invariance.py)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.reader = CheckpointReader(model_dir, self.model_config)
        self.device = resolve_device("auto")  # the GPU Ray gave this actor, if any
        self.dtype = resolve_dtype(dtype, self.device)
        self.versions: dict[int, dict[int, ExpertStack]] = {
            version: load_expert_stacks(self.reader, hosted, self.dtype, self.device, quantization)
        }
        # {version: {layer: {expert: share}}}: this actor's share of each replicated expert, per version held.
        self.shares: dict[int, dict[int, dict[int, float]]] = {version: shares or {}}
        warm_up_stacks(self.stacks.values())  # on a GPU: the kernels compiled and tuned before the first batch
        self._delays: list[float] = []
        self._stage_lock = threading.Lock()
        self._sockets: dict[str, ExpertSocketServer] = {}  # listen address -> the socket transport's listener there
        logger.info("expert actor %d hosts %d experts on %s", actor_index, sum(len(s.expert_ids) for s in self.stacks.values()), self.device)

    @property
    def stacks(self) -> dict[int, ExpertStack]:
        """The newest version's stacks."""
        versions = self.versions
        return versions[max(versions)]

    def ready(self) -> bool:
        return True

    # -- placement versions ---------------------------------------------------------
    def stage(self, version: int, hosted: dict[int, list[int]], shares: dict[int, dict[int, float]] | None = None) -> dict:
        """Hold ``version``'s experts ({layer: expert ids}) beside the ones in use, and this actor's ``shares`` of
        its replicated experts ({layer: {expert: share}}); a ``StageReport`` as a dict.

        Layers whose experts do not change share the current stack; experts held already are taken from it
        (their prepacked tensors shared, stacked ones copied); only the others are read from the checkpoint.
        Called in the control group: it runs on its own thread while ``run_experts`` keeps serving the
        current version."""
        started = time.monotonic()
        with self._stage_lock:
            loaded = 0
            existing = self.versions.get(version)
            if existing is not None and _layout(existing) != {layer: tuple(sorted(set(es))) for layer, es in hosted.items() if es}:
                raise ValueError(f"expert actor {self.actor_index} holds another layout as version {version}")
            if existing is None:
                stacks, loaded = self._build(hosted)
                self.versions = {**self.versions, version: stacks}  # one reference swap: readers see old or new
            self.shares[version] = shares or {}
        report = StageReport(self.actor_index, version, loaded, self._held_bytes(), time.monotonic() - started)
        logger.info("expert actor %d staged version %d: %d bytes read in %.2fs", self.actor_index, version, loaded, report.seconds)
        return asdict(report)

    def _build(self, hosted: dict[int, list[int]]) -> tuple[dict[int, ExpertStack], int]:
        current = self.stacks
        have = {(layer, e): (stack, i) for layer, stack in current.items() for i, e in enumerate(stack.expert_ids)}
        stacks, missing = {}, {}
        for layer, experts in hosted.items():
            ids = tuple(sorted(set(experts)))
            if layer in current and current[layer].expert_ids == ids:
                stacks[layer] = current[layer]  # unchanged: shared, no copy
            elif ids:
                missing[layer] = [e for e in ids if (layer, e) not in have]
        read = load_expert_stacks(
            self.reader, {layer: es for layer, es in missing.items() if es}, self.dtype, self.device, self.quantization
        )
        loaded = sum(stack.nbytes() for stack in read.values())
        for layer, es in missing.items():
            for i, e in enumerate(read[layer].expert_ids if layer in read else ()):
                have[(layer, e)] = (read[layer], i)
            ids = tuple(sorted(set(hosted[layer])))
            stacks[layer] = stack_experts(ids, [stack.expert(i) for stack, i in (have[(layer, e)] for e in ids)], self.quantization)
        return stacks, loaded

    def retire(self, keep: int) -> int:
        """Drop every version but ``keep`` (the coordinator has switched to it); the weight bytes still held."""
        with self._stage_lock:
            if keep in self.versions:
                self.versions = {keep: self.versions[keep]}
                self.shares = {keep: self.shares.get(keep, {})}
        return held_bytes(self.stacks.values())

    def _held_bytes(self) -> int:
        return held_bytes(s for stacks in self.versions.values() for s in stacks.values())

    def adopt(self, version: int, hosted: dict[int, list[int]], shares: dict[int, dict[int, float]] | None = None) -> bool:
        """The coordinator's probe: hold ``version`` (loading it now if this actor restarted since) and only it."""
        if version not in self.versions:
            self.stage(version, hosted, shares)
            self.retire(version)
        return True

    def delay_next_calls(self, seconds: float, count: int = 1) -> None:
        """Fault injection for tests and drills: the next ``count`` calls of ``run_experts`` first sleep ``seconds``."""
        self._delays = [seconds] * count

    def run_experts(self, message: bytes) -> bytes:
        """One MoE layer's work over bytes (the socket, actor-call and compiled-graph transports): an encoded
        ``ExpertBatch`` in, its encoded ``ExpertReply`` out."""
        if message == NO_WORK:
            if self._delays:
                time.sleep(self._delays.pop())
            return NO_WORK  # no rows for this actor in this layer (compiled graphs call every actor)
        return self.run_batch(ExpertBatch.decode(message)).encode()

    @torch.inference_mode()
    def run_batch(self, batch: ExpertBatch) -> ExpertReply:
        """One MoE layer's work: the weighted expert outputs [n, D] of the batch's rows, in float32 on this actor's
        device (partial sums: the coordinator adds the other actors' and rounds to its dtype once)."""
        if self._delays:
            time.sleep(self._delays.pop())
        stacks = self.versions.get(batch.version)
        if stacks is None:
            return ExpertReply(batch.tag, batch.rows[:0], stale=True)
        stack = stacks[batch.layer]
        rows = batch.rows.to(self.device, self.dtype)  # the coordinator's precision may differ from this actor's
        with batch_invariant(self.batch_invariant):
            out = stack.run(rows, batch.local_ids.to(self.device).long(), batch.weights.to(self.device), torch.float32)
        return ExpertReply(batch.tag, out)

    def open_socket(self, secret: bytes, coordinator_ip: str) -> tuple[str, int]:
        """The socket transport's address for a coordinator on ``coordinator_ip``, which connects with ``secret``:
        127.0.0.1 when it runs on this node, this node's address otherwise. Called in the control group."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        host = "127.0.0.1" if coordinator_ip == node_ip else node_ip
        with self._stage_lock:
            server = self._sockets.get(host)
            if server is None:
                server = self._sockets[host] = ExpertSocketServer(host, self.run_experts)
            server.allow(secret)
        return server.address

    def open_channel(self, secret: bytes, coordinator_ip: str, coordinator_device: str) -> ChannelAddress:
        """The collective transport's channel for a coordinator on ``coordinator_ip`` (device type
        ``coordinator_device``), which joins it and sends ``secret`` first; its store listens on 127.0.0.1 when
        the coordinator runs on this node, on this node's address otherwise. Called in the control group."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        host = "127.0.0.1" if coordinator_ip == node_ip else node_ip
        return open_channel(host, secret, self.device, coordinator_device, self.run_batch)

    def info(self) -> dict:
        """Where this actor runs and what it holds."""
        import ray

        context = ray.get_runtime_context()
        return {
            "actor_index": self.actor_index,
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
            "device": str(self.device),
            "hosted": {layer: list(stack.expert_ids) for layer, stack in self.stacks.items()},
            "versions": sorted(self.versions),
            "weight_bytes": self._held_bytes(),
        }

    def layouts(self) -> dict[int, dict[int, list[int]]]:
        """{version: {layer: expert ids}} of every version held (a restarted pool manager reads the placement here)."""
        return {version: {layer: list(ids) for layer, ids in _layout(stacks).items()} for version, stacks in self.versions.items()}

    def held_shares(self) -> dict[int, dict[int, dict[int, float]]]:
        """{version: {layer: {expert: share}}} of every version held: a restarted pool manager reads the split of
        each replicated expert here."""
        return {version: self.shares.get(version, {}) for version in self.versions}

    def hosted_keys(self) -> list[str]:
        """The checkpoint keys of every expert tensor this actor holds."""
        keys = []
        for layer, stack in self.stacks.items():
            for expert in stack.expert_ids:
                keys.extend(expert_weight_shapes(self.model_config, ExpertKey(layer, expert)))
        return sorted(keys)


def _layout(stacks: dict[int, ExpertStack]) -> dict[int, tuple[int, ...]]:
    """{layer: expert ids} of one version's stacks."""
    return {layer: stack.expert_ids for layer, stack in stacks.items()}
