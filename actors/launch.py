"""Start (and stop) the expert-sharded cluster: N expert actors and one coordinator on Ray.

All actors are scheduled into one placement group, so the cluster comes up
whole or fails as one (a bundle that cannot be placed is reported before any
weight is read). Expert actors are restarted by Ray after a crash and reload
their experts; a bundle may carry custom resources to pin an actor to a node.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeshard.actors.coordinator import Coordinator
from moeshard.actors.expert_actor import ExpertActor
from moeshard.actors.transport import ActorRef
from moeshard.cluster.config import EngineConfig, ModelConfig
from moeshard.cluster.generation import RequestOutput
from moeshard.cluster.placement import ExpertPlacement
from moeshard.cluster.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """The cluster could not be brought up; nothing is left running."""


def make_placement(config: EngineConfig, model_config: ModelConfig) -> ExpertPlacement:
    cluster = config.cluster
    if cluster.expert_map is not None:
        return ExpertPlacement.from_expert_map(
            model_config.num_layers, model_config.num_experts, cluster.expert_actors, cluster.expert_map
        )
    return ExpertPlacement.even(model_config.num_layers, model_config.num_experts, cluster.expert_actors)


def describe_actor(placement: ExpertPlacement, actor: int) -> str:
    hosted = placement.hosted_by(actor)
    experts = sorted({e for es in hosted.values() for e in es})
    return f"expert actor {actor} (experts {experts} in {len(hosted)} layers)"


@dataclass
class ExpertCluster:
    config: EngineConfig
    placement: ExpertPlacement
    coordinator: object  # ActorHandle of Coordinator
    expert_actors: list  # ActorHandles of ExpertActor
    group: object  # PlacementGroup
    started_ray: bool

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        return ray.get(self.coordinator.generate.remote(prompts, params))

    def logits(self, token_ids: list[int]):
        return ray.get(self.coordinator.logits.remote(token_ids))

    def placement_report(self) -> list[dict]:
        infos = ray.get([a.info.remote() for a in self.expert_actors], timeout=self.config.cluster.dispatch_timeout_s)
        report = []
        for layer, experts in enumerate(self.placement.hosts):
            for expert, actors in enumerate(experts):
                report.append(
                    {
                        "layer": layer,
                        "expert": expert,
                        "actors": list(actors),
                        "nodes": [infos[a]["node_id"] for a in actors],
                    }
                )
        return report

    def shutdown(self) -> None:
        try:
            ray.get(self.coordinator.close.remote(), timeout=30)
        except Exception as exc:  # a coordinator that is already gone has nothing to close
            logger.warning("coordinator close: %s", exc)
        for handle in [self.coordinator, *self.expert_actors]:
            ray.kill(handle, no_restart=True)
        remove_placement_group(self.group)
        if self.started_ray:
            ray.shutdown()


def _bundles(config: EngineConfig, use_gpus: bool) -> list[dict[str, float]]:
    cluster = config.cluster
    bundles = []
    for actor in range(cluster.expert_actors):
        bundle = {"CPU": cluster.cpus_per_actor} if cluster.cpus_per_actor else {}
        if use_gpus:
            bundle["GPU"] = 1.0
        if cluster.actor_resources is not None:
            bundle.update(cluster.actor_resources[actor])
        bundles.append(bundle or {"CPU": 0.001})
    bundles.append({"CPU": 1.0, **cluster.coordinator_resources})
    return bundles


def _connect(config: EngineConfig) -> bool:
    """Join the given Ray cluster, or start a local one; True if this call started Ray."""
    if ray.is_initialized():
        return False
    address = config.cluster.ray_address
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        return True  # disconnect (not stop) the cluster at shutdown
    # A local cluster with enough logical CPUs for one bundle per actor (actors mostly wait on each other).
    num_cpus = max(os.cpu_count() or 1, int(config.cluster.expert_actors * config.cluster.cpus_per_actor) + 2)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def launch_cluster(config: EngineConfig, model_config: ModelConfig) -> ExpertCluster:
    cluster = config.cluster
    placement = make_placement(config, model_config)
    started_ray = _connect(config)
    use_gpus = cluster.use_gpus if cluster.use_gpus is not None else ray.cluster_resources().get("GPU", 0) >= 1
    group = placement_group(_bundles(config, use_gpus), strategy=cluster.placement_strategy)
    try:
        ray.get(group.ready(), timeout=cluster.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        if started_ray:
            ray.shutdown()
        raise ClusterStartError(
            f"could not place {cluster.expert_actors} expert actors and a coordinator within "
            f"{cluster.startup_timeout_s:.0f}s: bundles {_bundles(config, use_gpus)} do not fit the cluster's resources "
            f"{ray.cluster_resources() if ray.is_initialized() else ''}"
        ) from None

    def strategy(bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)

    bundles = _bundles(config, use_gpus)
    expert_cls = ray.remote(ExpertActor)
    experts = []
    for actor in range(cluster.expert_actors):
        experts.append(
            expert_cls.options(
                num_cpus=bundles[actor].get("CPU", 0),
                num_gpus=bundles[actor].get("GPU", 0),
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=strategy(actor),
                name=None,
            ).remote(actor, config.model_dir, config.dtype, placement.hosted_by(actor))
        )
    refs = [ActorRef(i, handle, describe_actor(placement, i)) for i, handle in enumerate(experts)]
    coordinator = (
        ray.remote(Coordinator)
        .options(num_cpus=1, max_restarts=0, scheduling_strategy=strategy(cluster.expert_actors))
        .remote(config, placement, refs)
    )
    handle = ExpertCluster(config, placement, coordinator, experts, group, started_ray)
    try:
        ray.get([a.ready.remote() for a in experts] + [coordinator.ready.remote()], timeout=cluster.startup_timeout_s)
    except Exception as exc:
        handle.shutdown()
        raise ClusterStartError(f"the expert cluster failed to start: {exc}") from exc
    logger.info("expert cluster up: %d expert actors + coordinator", cluster.expert_actors)
    return handle

