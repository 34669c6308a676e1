"""The expert actor: hosts some experts of every MoE layer and runs them on the rows it is sent.

It reads only its own experts from the checkpoint (by key, on its own node).
Ray restarts it after a crash; ``__init__`` then reloads the same experts.

Dimensions: n rows sent here, D hidden, K chosen per token.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from moeshard.actors.wire import NO_WORK, ExpertBatch, ExpertReply
from moeshard.cluster.model.checkpoint import CheckpointReader, ExpertKey, expert_weight_shapes
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.device import resolve_device, resolve_dtype
from moeshard.cluster.model.moe import load_expert_stacks

logger = logging.getLogger(__name__)


class ExpertActor:
    def __init__(self, actor_index: int, model_dir: str, dtype: str, hosted: dict[int, list[int]]):
        self.actor_index = actor_index
        self.model_config = ModelConfig.from_model_dir(model_dir)
        reader = CheckpointReader(model_dir, self.model_config)
        self.device = resolve_device("auto")  # the GPU Ray gave this actor, if any
        self.dtype = resolve_dtype(dtype, self.device)
        self.stacks = load_expert_stacks(reader, hosted, self.dtype, self.device)
        self._delays: list[float] = []
        logger.info("expert actor %d hosts %d experts on %s", actor_index, sum(len(s.expert_ids) for s in self.stacks.values()), self.device)

    def ready(self) -> bool:
        return True

    def delay_next_calls(self, seconds: float, count: int = 1) -> None:
        """Fault injection for tests and drills: the next ``count`` calls of ``run_experts`` first sleep ``seconds``."""
        self._delays = [seconds] * count

    @torch.inference_mode()
    def run_experts(self, message: bytes) -> bytes:
        """One MoE layer's work: an encoded ``ExpertBatch`` in, the weighted expert outputs [n, D] out."""
        if self._delays:
            time.sleep(self._delays.pop())
        if message == NO_WORK:
            return NO_WORK  # no rows for this actor in this layer (compiled graphs call every actor)
        batch = ExpertBatch.decode(message)
        stack = self.stacks[batch.layer]
        rows = batch.rows.to(self.device, self.dtype)  # the coordinator's precision may differ from this actor's
        out = stack.run(rows, batch.local_ids.to(self.device).long(), batch.weights.to(self.device))
        return ExpertReply(batch.tag, out.to("cpu", batch.rows.dtype)).encode()

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
            "weight_bytes": sum(stack.nbytes() for stack in self.stacks.values()),
        }

    def hosted_keys(self) -> list[str]:
        """The checkpoint keys of every expert tensor this actor holds."""
        keys = []
        for layer, stack in self.stacks.items():
            for expert in stack.expert_ids:
                keys.extend(expert_weight_shapes(self.model_config, ExpertKey(layer, expert)))
        return sorted(keys)
