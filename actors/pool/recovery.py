"""A shared pool's manager, restarted by Ray after a crash, takes back the pool it had: nothing is reloaded.

A shared pool's expert actors and placement groups are named after the pool and detached, so they outlive
its manager. The restarted manager finds the actors by name (indices are dense: 0, 1, ... up to the first
missing one), the placement groups by name prefix, and the placement from what the actors hold
(``ExpertActor.layouts``):

- every actor holds one version, the same: that is the placement (the usual case: the manager died idle);
- otherwise (it died in the middle of a scaling or a rebalance): a placement one version past every one
  held, from each actor's newest layout, with any expert left without a host given to the actor with the
  fewest. The manager stages it, publishes it and retires the rest (``ExpertPoolService`` does, on a thread),
  so every coordinator ends on it whatever it had switched to.

Each actor keeps its share of every replicated expert it hosts, per version (``ExpertActor.held_shares``): a
recovered placement that every actor agrees on gets its shares back, so the pool's balance survives the
restart. A placement rebuilt from a change cut short splits a replicated expert's tokens equally until the
next rebalance. Each coordinator dispatches on meanwhile with the placement it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import get_placement_group, placement_group_table

from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.pool.expert_pool import POOL_NAMESPACE, ExpertPool, actor_name, actors_use_gpus, describe_actor
from moeshard.actors.transport import ActorRef
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveredPool:
    pool: ExpertPool
    consistent: bool  # every actor holds exactly the placement recovered; False: it must be staged and published


def recover_expert_pool(config: EngineConfig, model_config: ModelConfig) -> RecoveredPool | None:
    """The pool named ``config.cluster.pool_name`` as its actors left it; None if it has no actors (a new pool)."""
    name = config.cluster.pool_name
    handles = []
    while True:
        try:
            handles.append(ray.get_actor(actor_name(name, len(handles)), namespace=POOL_NAMESPACE))
        except ValueError:
            break
    if not handles:
        return None
    # An actor restarting reloads first: wait for it, as a new pool would.
    layouts = ray.get([h.layouts.remote() for h in handles], timeout=config.cluster.startup_timeout_s)
    placement, consistent = placement_from_layouts(layouts, model_config.num_layers, model_config.num_experts, model_config.dense_layers)
    if consistent:
        held = ray.get([h.held_shares.remote() for h in handles], timeout=config.cluster.startup_timeout_s)
        placement = with_held_shares(placement, [shares.get(placement.version, {}) for shares in held])
    actors = [ActorRef(i, h, describe_actor(placement, i)) for i, h in enumerate(handles)]
    first, added = _groups(name)
    use_gpus = actors_use_gpus(config)
    pool = ExpertPool(config, placement, actors, first, use_gpus, added)
    logger.warning(
        "took back expert pool %r: %d actors at placement version %d%s",
        name, len(actors), placement.version, "" if consistent else " (to be staged: the last change was cut short)",
    )  # fmt: skip
    return RecoveredPool(pool, consistent)


def placement_from_layouts(
    layouts: list[dict[int, dict[int, list[int]]]], num_layers: int, num_experts: int, dense_layers: tuple[int, ...] = ()
) -> tuple[ExpertPlacement, bool]:
    """The placement the actors hold ([actor] -> {version: {layer: expert ids}}), and whether they agree on it."""
    versions = {v for held in layouts for v in held}
    consistent = all(len(held) == 1 for held in layouts) and len(versions) == 1
    newest = [held[max(held)] if held else {} for held in layouts]  # [actor] {layer: ids}
    hosts = []
    for layer in range(num_layers):
        if layer in dense_layers:
            hosts.append(())
            continue
        per_expert = [[a for a, held in enumerate(newest) if e in held.get(layer, ())] for e in range(num_experts)]
        for e, actors in enumerate(per_expert):
            if not actors:  # moved away and not yet loaded where it was going: the actor with the fewest takes it
                consistent = False
                counts = [sum(a in hs for hs in per_expert) for a in range(len(layouts))]
                actors.append(min(range(len(layouts)), key=lambda a: (counts[a], a)))
        hosts.append(tuple(tuple(actors) for actors in per_expert))
    version = max(versions) if consistent else max(versions, default=0) + 1
    return ExpertPlacement(num_actors=len(layouts), hosts=tuple(hosts), version=version), consistent


def with_held_shares(placement: ExpertPlacement, held: list[dict[int, dict[int, float]]]) -> ExpertPlacement:
    """``placement`` with each replicated expert split as its hosts hold it ([actor] -> {layer: {expert: share}});
    an expert whose hosts do not all hold a share for it is split equally. Unchanged when no actor holds any."""
    if not any(held):
        return placement
    shares = []
    for layer, experts in enumerate(placement.hosts):
        split = []
        for expert, actors in enumerate(experts):
            kept = [held[a].get(layer, {}).get(expert) for a in actors]
            if len(actors) > 1 and None not in kept and sum(kept) > 0:
                split.append(tuple(s / sum(kept) for s in kept))
            else:
                split.append(tuple(1.0 / len(actors) for _ in actors))
        shares.append(tuple(split))
    return ExpertPlacement(num_actors=placement.num_actors, hosts=placement.hosts, shares=tuple(shares), version=placement.version)


def _groups(name: str) -> tuple[object | None, list[tuple[object, set[int]]]]:
    """The pool's placement groups by name: the one it started with, and those of scaled-up actors with their
    actor indices."""
    first, added = None, []
    prefix = f"{name}:group:"
    for info in placement_group_table().values():
        group_name = info.get("name", "")
        if not group_name.startswith(prefix) or info.get("state") == "REMOVED":
            continue
        low, high = (int(i) for i in group_name[len(prefix) :].split("-"))
        try:
            group = get_placement_group(group_name)
        except ValueError:  # named in another namespace: left to the cluster's shutdown
            logger.warning("placement group %s not found by name; it stays until the cluster stops", group_name)
            continue
        if low == 0 and first is None:
            first = group
        else:
            added.append((group, set(range(low, high + 1))))
    return first, added
