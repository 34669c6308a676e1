"""The coordinator actor: embeddings, attention and its KV cache, routers, LM head, sampling.

It never loads an expert weight: its engine's experts function is
``RemoteExperts``, which dispatches every MoE layer to the expert actors.
"""

from __future__ import annotations

import logging

import torch

from moeshard.actors.dispatch import RemoteExperts
from moeshard.actors.transport import ActorCallTransport, ActorRef, CompiledGraphTransport
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.engine.generation import RequestOutput, generate_to_completion
from moeshard.actors.placement import ExpertPlacement
from moeshard.cluster.engine.assembly import build_engine, maybe_tokenizer
from moeshard.cluster.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

TRANSPORTS = {"actor_calls": ActorCallTransport, "compiled_graph": CompiledGraphTransport}


def remote_experts(config: EngineConfig, placement: ExpertPlacement, actors: list[ActorRef]) -> RemoteExperts:
    """The experts function that dispatches to ``actors`` over the configured transport."""
    transport = TRANSPORTS[config.cluster.transport](actors, config.cluster.dispatch_timeout_s)
    return RemoteExperts(placement, transport)


class OfflineCoordinator:
    def __init__(self, config: EngineConfig, placement: ExpertPlacement, actors: list[ActorRef]):
        self.config = config
        self.model_config = ModelConfig.from_model_dir(config.model_dir)
        self.tokenizer = maybe_tokenizer(config.model_dir)
        self.experts = remote_experts(config, placement, actors)
        self.engine = build_engine(config, self.model_config, self.tokenizer, lambda reader, dtype: self.experts)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        return generate_to_completion(self.engine, self.tokenizer, prompts, params)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.engine.prompt_logits(token_ids)

    def tensor_names(self) -> list[str]:
        """Every weight this process holds, for checking that none is an expert's."""
        w = self.engine.model.weights
        names = ["embed", "final_norm", "lm_head"]
        for layer, lw in enumerate(w.layers):
            names.extend(f"layers.{layer}.{field}" for field in vars(lw))
        return names

    def close(self) -> None:
        self.experts.transport.close()
