"""The offline coordinator: the Ray actor behind ``LLM(expert_actors=N)``.

It runs embeddings, attention and its KV cache, routers, LM head and sampling,
and never loads an expert weight: its engine's experts function is
``RemoteExperts``, which dispatches every MoE layer to the expert actors.
(The serving coordinator is the Serve replica, ``deploy/app.py``.)
"""

from __future__ import annotations

import logging
import os

import torch

from moeshard.actors.actor_health import HealthSnapshot
from moeshard.actors.dispatch import remote_experts
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.pool.service import attach_expert_pool
from moeshard.actors.rebalance.auto import start_auto_rebalance
from moeshard.actors.rebalance.live import Rebalancer, RebalanceReport
from moeshard.actors.transport import ActorRef
from moeshard.cluster.analysis.capture import RoutedTokens, route_tokens
from moeshard.cluster.engine.assembly import build_engine, read_model_files
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.generation import RequestOutput, generate_to_completion
from moeshard.cluster.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class OfflineCoordinator:
    def __init__(self, config: EngineConfig, placement: ExpertPlacement, actors: list[ActorRef]):
        self.config = config
        torch.set_num_threads(config.cluster.coordinator_cpus)  # the CPUs it asked Ray for
        files = read_model_files(config.model_dir)
        self.tokenizer = files.tokenizer
        self.experts = remote_experts(config, placement, actors)
        self.rebalancer = Rebalancer(self.experts, config.cluster.recovery_timeout_s + config.cluster.dispatch_timeout_s)
        self.engine = build_engine(config, files, self.experts)
        # None unless cluster.auto_rebalance_s; a shared pool's manager rebalances it (and runs its automatic rebalancing).
        self.auto = start_auto_rebalance(config.cluster, self.rebalancer) if config.cluster.pool_name is None else None
        self.pool = None  # a shared pool: this coordinator reports its load and follows the pool's placements
        if config.cluster.pool_name is not None:
            self.pool = attach_expert_pool(config, files.model_config)
            self.pool.follow(self.experts)

    def ready(self) -> bool:
        return True

    def info(self) -> dict:
        """The process: its id and the torch threads its work runs on."""
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        return generate_to_completion(self.engine, self.tokenizer, prompts, params)

    def expert_health(self) -> HealthSnapshot:
        return self.experts.health.snapshot()

    def rebalance(self) -> RebalanceReport:
        """A new placement from the load since the last one, switched in between two steps of any generation."""
        return self.rebalancer.rebalance()

    def report_load(self) -> None:
        """A shared pool's coordinator checks in now, so that a rebalance of the pool counts its load up to now."""
        if self.pool is not None:
            self.pool.report_load()

    def hold_rebalancing(self, timeout_s: float | None) -> ExpertPlacement | None:
        """Keep rebalances (asked for or automatic) out while the driver scales this pool: takes the rebalancer's
        lock, waiting up to ``timeout_s`` (None: not at all). Returns the placement dispatched with now, which a
        rebalance may have changed since the driver last saw it, or None when a rebalance held on."""
        lock = self.rebalancer.lock
        taken = lock.acquire(blocking=False) if timeout_s is None else lock.acquire(timeout=timeout_s)
        return self.experts.placement if taken else None

    def release_rebalancing(self) -> None:
        self.rebalancer.lock.release()

    def rebalancing(self) -> bool:
        return self.rebalancer.lock.locked()

    def switch_experts(self, placement: ExpertPlacement, actors: list[ActorRef], timeout_s: float) -> bool:
        """The pool was scaled: dispatch with ``placement`` over ``actors`` from the next step on; True once it does."""
        return self.experts.switch(placement, timeout_s, actors)

    def expert_balance(self) -> dict:
        return self.rebalancer.status()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.engine.prompt_logits(token_ids)

    def route_tokens(self, token_ids: list[int]) -> RoutedTokens:
        return route_tokens(self.engine, token_ids)

    def tensor_names(self) -> list[str]:
        """Every weight this process holds, for checking that none is a routed expert's (a shared expert is ours)."""
        w = self.engine.model.weights
        names = ["embed", "final_norm", "lm_head"]
        for layer, lw in enumerate(w.layers):
            names.extend(f"layers.{layer}.{field}" for field, value in vars(lw).items() if value is not None)
        return names

    def close(self) -> None:
        if self.auto is not None:
            self.auto.close()
        if self.pool is not None:
            self.pool.shutdown()  # detaches; the pool goes on
        self.experts.transport.close()
