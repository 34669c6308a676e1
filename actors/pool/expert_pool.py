"""Start and stop the pool of expert actors, all in one placement group.

The group holds one bundle per expert actor (and optionally one for the
coordinator), so the pool comes up whole or fails as one: a bundle that cannot
be placed is reported before any weight is read. Ray restarts a crashed expert
actor, which reloads its experts; a bundle may carry custom resources (or
``node:<ip>``) to pin an actor to a node. Each actor takes one GPU when the
cluster has GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeshard.actors.actor_health import HealthSnapshot
from moeshard.actors.expert_actor import CONTROL_GROUP, ExpertActor
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.rebalance.plan import initial_placement
from moeshard.actors.transport import ActorRef
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.errors import one_line
from moeshard.cluster.model.config import ModelConfig

logger = logging.getLogger(__name__)


POOL_NAMESPACE = "moeshard"  # a shared pool's manager, actors and placement groups are named in it


def actor_name(pool_name: str, index: int) -> str:
    return f"{pool_name}:actor:{index}"


def group_name(pool_name: str, indices: list[int]) -> str:
    return f"{pool_name}:group:{indices[0]}-{indices[-1]}"


class ClusterStartError(RuntimeError):
    """The expert actors could not be brought up; nothing is left running."""


def make_placement(config: EngineConfig, model_config: ModelConfig) -> ExpertPlacement:
    cluster = config.cluster
    if cluster.redundant_experts:
        return initial_placement(
            model_config.num_layers,
            model_config.num_experts,
            cluster.expert_actors,
            cluster.redundant_experts,
            model_config.dense_layers,
        )
    if cluster.expert_map is not None:
        return ExpertPlacement.from_expert_map(
            model_config.num_layers,
            model_config.num_experts,
            cluster.expert_actors,
            cluster.expert_map,
            model_config.dense_layers,
        )
    return ExpertPlacement.even(
        model_config.num_layers, model_config.num_experts, cluster.expert_actors, model_config.dense_layers
    )


def describe_actor(placement: ExpertPlacement, actor: int) -> str:
    hosted = placement.hosted_by(actor)
    experts = sorted({e for es in hosted.values() for e in es})
    return f"expert actor {actor} (experts {_ranges(experts)} in {len(hosted)} layers)"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "[0, 1, 2, 3, 7]" for a few ids, "[0-3, 7]" when there are many (128 experts)."""
    if len(ids) <= 8:
        return str(ids)
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return "[" + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) + "]"


@dataclass
class ExpertPool:
    config: EngineConfig
    placement: ExpertPlacement
    actors: list[ActorRef]
    group: PlacementGroup  # the bundles of the actors it started with
    use_gpus: bool = False
    added_groups: list[tuple[PlacementGroup, set[int]]] = field(default_factory=list)  # scaled-up actors' groups

    def layout(self) -> tuple[ExpertPlacement, list[ActorRef]]:
        """The placement and the actors serving it, read together."""
        return self.placement, list(self.actors)

    def coordinator_strategy(self) -> PlacementGroupSchedulingStrategy:
        """Scheduling into the coordinator's bundle (the group's last one)."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.config.cluster.expert_actors
        )

    def health(self, dispatch: HealthSnapshot, timeout_s: float = 5.0) -> list[dict]:
        """Each actor's state: "ok"; "recovering" (down, or not answering, for less than the recovery timeout);
        "down" (longer). ``dispatch`` is what the coordinator's dispatch has seen."""
        _, actors = self.layout()
        refs = [a.handle.ready.remote() for a in actors]
        recovery_timeout_s = self.config.cluster.recovery_timeout_s
        states = []
        for actor, ref in zip(actors, refs):
            detail = None
            try:
                ray.get(ref, timeout=timeout_s)
                answers = True
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                answers, detail = False, type(exc).__name__
            down_for = dispatch.down_since.get(actor.index)
            if down_for is None and answers:
                state = "ok"
            elif detail == "ActorDiedError":  # Ray gave up restarting it
                state = "down"
            else:
                state = "down" if (down_for or 0.0) > recovery_timeout_s else "recovering"
            states.append(
                {
                    "actor": actor.index,
                    "state": state,
                    "failures": dispatch.failures[actor.index] if actor.index < len(dispatch.failures) else 0,
                    "down_for_s": round(down_for, 3) if down_for is not None else None,
                    "detail": detail,
                    "description": actor.description,
                }
            )
        return states

    def placement_report(self) -> list[dict]:
        placement, actors = self.layout()
        infos = ray.get([a.handle.info.remote() for a in actors], timeout=self.config.cluster.dispatch_timeout_s)
        return [
            {
                "layer": layer,
                "expert": expert,
                "actors": list(hosts),
                "nodes": [infos[a]["node_id"] for a in hosts],
                "shares": list(placement.shares_of(layer)[expert]),
            }
            for layer, experts in enumerate(placement.hosts)
            for expert, hosts in enumerate(experts)
        ]

    def stop_actors(self, actors: list[ActorRef]) -> None:
        """Stop actors no coordinator sends work any more; a scaled-up group whose actors are all gone is freed
        (the bundles of the actors the pool started with stay reserved until it stops)."""
        for actor in actors:
            ray.kill(actor.handle, no_restart=True)
        gone = {a.index for a in actors}
        for group, members in list(self.added_groups):
            members -= gone
            if not members:
                remove_placement_group(group)
                self.added_groups.remove((group, members))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        if self.group is not None:  # None: a recovered pool whose first group was not found
            remove_placement_group(self.group)
        for group, _ in self.added_groups:
            remove_placement_group(group)


def actors_use_gpus(config: EngineConfig) -> bool:
    """``cluster.use_gpus``, or where unset whether the Ray cluster has GPUs; never for int8 experts (CPU only)."""
    if config.quantization == "experts_int8":
        return False
    if config.cluster.use_gpus is not None:
        return config.cluster.use_gpus
    return ray.cluster_resources().get("GPU", 0) >= 1


def _actor_bundle(config: EngineConfig, use_gpus: bool, actor: int) -> dict[str, float]:
    """Actor ``actor``'s resources; one beyond the configured ``actor_resources`` (scaled up) takes the plain ones."""
    cluster = config.cluster
    bundle = {"CPU": cluster.cpus_per_actor} if cluster.cpus_per_actor else {}
    if use_gpus:
        bundle["GPU"] = 1.0
    if cluster.actor_resources is not None and actor < len(cluster.actor_resources):
        bundle.update(cluster.actor_resources[actor])
    return bundle or {"CPU": 0.001}


def _bundles(config: EngineConfig, use_gpus: bool, with_coordinator: bool) -> list[dict[str, float]]:
    cluster = config.cluster
    bundles = [_actor_bundle(config, use_gpus, actor) for actor in range(cluster.expert_actors)]
    if with_coordinator:
        bundles.append({"CPU": float(cluster.coordinator_cpus), **cluster.coordinator_resources})
    return bundles


def start_expert_pool(config: EngineConfig, model_config: ModelConfig, with_coordinator: bool = False) -> ExpertPool:
    """Place and start the expert actors; waits until every one has loaded its experts."""
    cluster = config.cluster
    placement = make_placement(config, model_config)
    use_gpus = actors_use_gpus(config)
    bundles = _bundles(config, use_gpus, with_coordinator)
    group = _placed_group(config, bundles, list(range(cluster.expert_actors)))
    actors = [_start_actor(config, placement, index, group, index, bundles[index]) for index in range(cluster.expert_actors)]
    pool = ExpertPool(config, placement, actors, group, use_gpus)
    try:
        ray.get([a.handle.ready.remote() for a in actors], timeout=cluster.startup_timeout_s)
    except Exception as exc:
        pool.shutdown()
        raise ClusterStartError(f"expert actors failed to start: {one_line(exc)}") from exc
    logger.info("started %d expert actors", cluster.expert_actors)
    return pool


class ReservedActors(NamedTuple):
    """Room held for actors about to be added: their placement group, ready, and its bundles."""

    indices: list[int]
    group: PlacementGroup
    bundles: list[dict[str, float]]


def reserve_actors(pool: ExpertPool, indices: Iterable[int]) -> ReservedActors:
    """Place the bundles of actors ``indices`` in a placement group of their own, wherever the cluster has room;
    waits up to ``startup_timeout_s`` for it (a node added meanwhile counts). Raises ``ClusterStartError``."""
    indices = list(indices)
    bundles = [_actor_bundle(pool.config, pool.use_gpus, index) for index in indices]
    return ReservedActors(indices, _placed_group(pool.config, bundles, indices), bundles)


def release_actors(reserved: ReservedActors) -> None:
    """Give back room reserved for actors that will not be started."""
    remove_placement_group(reserved.group)


def add_actors(pool: ExpertPool, placement: ExpertPlacement, reserved: ReservedActors) -> list[ActorRef]:
    """Start the reserved actors with their experts of ``placement`` (its version); waits until they have loaded
    them. On failure nothing is left running and the room is given back."""
    config = pool.config
    actors = [
        _start_actor(config, placement, index, reserved.group, i, reserved.bundles[i]) for i, index in enumerate(reserved.indices)
    ]
    try:
        ray.get([a.handle.ready.remote() for a in actors], timeout=config.cluster.startup_timeout_s)
    except Exception as exc:
        for actor in actors:
            ray.kill(actor.handle, no_restart=True)
        release_actors(reserved)
        raise ClusterStartError(f"expert actors failed to start: {one_line(exc)}") from exc
    pool.added_groups.append((reserved.group, set(reserved.indices)))
    logger.info("started expert actors %s", reserved.indices)
    return actors


def _placed_group(config: EngineConfig, bundles: list[dict[str, float]], indices: list[int]) -> PlacementGroup:
    """A ready placement group for the bundles of actors ``indices`` (a shared pool's is named and detached)."""
    cluster = config.cluster
    if cluster.pool_name is None:
        group = placement_group(bundles, strategy=cluster.placement_strategy)
    else:
        name = group_name(cluster.pool_name, indices)
        group = placement_group(bundles, strategy=cluster.placement_strategy, name=name, lifetime="detached")
    try:
        ray.get(group.ready(), timeout=cluster.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ClusterStartError(
            f"could not place the expert actors' {len(bundles)} bundles within {cluster.startup_timeout_s:.0f}s: "
            f"bundles {bundles} do not fit the cluster's resources {ray.cluster_resources()}"
        ) from None
    return group


def _start_actor(config: EngineConfig, placement: ExpertPlacement, index: int, group, bundle_index: int, bundle) -> ActorRef:
    expert_cls = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(ExpertActor)  # stage/retire beside run_experts
    named = {}
    if config.cluster.pool_name is not None:  # a shared pool's actors outlive a crash of its manager
        named = {"name": actor_name(config.cluster.pool_name, index), "namespace": POOL_NAMESPACE, "lifetime": "detached"}
    handle = expert_cls.options(
        **named,
        num_cpus=bundle.get("CPU", 0),
        num_gpus=bundle.get("GPU", 0),
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=config.cluster.actor_concurrency or 1,  # run_experts calls at once (control calls have their own thread)
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle_index),
    ).remote(
        index, config.model_dir, config.dtype, placement.hosted_by(index), placement.version, placement.shares_held_by(index),
        config.quantization, config.batch_invariant,
    )
    return ActorRef(index, handle, describe_actor(placement, index))
