"""The offline cluster behind ``LLM(expert_actors=N)``: a coordinator actor over a pool of expert actors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from moeshard.actors.offline_coordinator import OfflineCoordinator
from moeshard.actors.pool.expert_pool import ClusterStartError, ExpertPool, start_expert_pool
from moeshard.actors.pool.service import SharedExpertPool, attach_expert_pool
from moeshard.actors.ray_init import connect_ray
from moeshard.actors.rebalance.scale import PoolScaler, ScaleReport
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.engine.generation import RequestOutput
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.errors import one_line
from moeshard.cluster.model.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["ClusterStartError", "ExpertCluster", "launch_cluster"]


@dataclass
class ExpertCluster:
    pool: ExpertPool
    coordinator: object  # ActorHandle of OfflineCoordinator
    connected_ray: bool
    _scaler: PoolScaler | None = None  # scales a pool of its own

    @property
    def placement(self):
        return self.pool.placement

    @property
    def expert_actors(self) -> list:
        return [a.handle for a in self.pool.layout()[1]]

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        return ray.get(self.coordinator.generate.remote(prompts, params))

    def logits(self, token_ids: list[int]):
        return ray.get(self.coordinator.logits.remote(token_ids))

    def route_tokens(self, token_ids: list[int]):
        return ray.get(self.coordinator.route_tokens.remote(token_ids))

    def expert_health(self):
        return ray.get(self.coordinator.expert_health.remote())

    def placement_report(self) -> list[dict]:
        return self.pool.placement_report()

    def rebalance(self):
        if isinstance(self.pool, SharedExpertPool):
            try:
                ray.get(self.coordinator.report_load.remote(), timeout=20)  # its load up to now counts too
            except Exception as exc:  # noqa: BLE001 - the manager answers for itself below
                logger.warning("the coordinator did not report its load before the rebalance: %s", exc)
            return self.pool.rebalance()  # the manager, from every coordinator's load
        report = ray.get(self.coordinator.rebalance.remote())
        if report.placement.version > self.pool.placement.version:  # a scaling since may have moved past it
            self.pool.placement = report.placement  # what placement_report shows
        return report

    def scale(self, expert_actors: int) -> ScaleReport:
        """Grow or shrink the pool while the coordinator serves (actors/rebalance/scale.py)."""
        if isinstance(self.pool, SharedExpertPool):
            return ScaleReport(**self.pool.scale(expert_actors))  # the manager scales; its coordinators follow
        if self._scaler is None:
            timeout_s = self.pool.config.cluster.recovery_timeout_s + self.pool.config.cluster.dispatch_timeout_s

            def publish(placement, actors) -> bool:
                return ray.get(self.coordinator.switch_experts.remote(placement, actors, timeout_s))

            self._scaler = PoolScaler(self.pool, publish, timeout_s, lock=CoordinatorRebalanceLock(self.coordinator, self.pool))
        return self._scaler.scale(expert_actors)

    def expert_balance(self) -> dict:
        if isinstance(self.pool, SharedExpertPool):
            return self.pool.balance()
        return ray.get(self.coordinator.expert_balance.remote())

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.close.remote(), timeout=30)
        except Exception as exc:  # a coordinator that is already gone has nothing to close
            logger.warning("coordinator close: %s", exc)
        ray.kill(self.coordinator, no_restart=True)
        self.pool.shutdown()
        if self.connected_ray:
            ray.shutdown()


class CoordinatorRebalanceLock:
    """The offline coordinator's rebalancer lock, as ``PoolScaler`` takes a lock, from the driver: a scaling of a
    pool of its own and the coordinator's rebalances (asked for or automatic) run one at a time. Taking it also
    brings the driver's copy of the placement up to date with any rebalance since."""

    def __init__(self, coordinator, pool: ExpertPool):
        self.coordinator = coordinator
        self.pool = pool

    def locked(self) -> bool:
        return ray.get(self.coordinator.rebalancing.remote())

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        wait_s = None if not blocking else (timeout if timeout >= 0 else 1e9)
        placement = ray.get(self.coordinator.hold_rebalancing.remote(wait_s))
        if placement is None:
            return False
        self.pool.placement = placement
        return True

    def release(self) -> None:
        ray.get(self.coordinator.release_rebalancing.remote())


def launch_cluster(config: EngineConfig, model_config: ModelConfig) -> ExpertCluster:
    connected = connect_ray(config)
    shared = config.cluster.pool_name is not None
    try:
        # A shared pool has no bundle for this coordinator: it may be one of several.
        pool = attach_expert_pool(config, model_config) if shared else start_expert_pool(config, model_config, with_coordinator=True)
    except Exception:
        if connected:
            ray.shutdown()
        raise
    strategy = "DEFAULT" if shared else pool.coordinator_strategy()
    coordinator = (
        ray.remote(OfflineCoordinator)
        # Four threads: expert_health, a rebalance and a scaling's hold on rebalances answer while a generate runs.
        .options(num_cpus=config.cluster.coordinator_cpus, max_restarts=0, max_concurrency=4, scheduling_strategy=strategy)
        .remote(config, pool.placement, pool.actors)
    )
    cluster = ExpertCluster(pool, coordinator, connected)
    try:
        ray.get(coordinator.ready.remote(), timeout=config.cluster.startup_timeout_s)
    except Exception as exc:
        cluster.shutdown()
        raise ClusterStartError(f"the coordinator failed to start: {one_line(exc)}") from exc
    logger.info("expert cluster up: %d expert actors + coordinator", config.cluster.expert_actors)
    return cluster
