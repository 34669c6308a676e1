"""Scaling the expert pool while serving: more or fewer expert actors, the placement switched between steps.

    1. plan      ``plan_scale``: the next placement over N2 actors, moving as few experts as it can
    2. start     growing: room for the new actors is reserved first (a placement group of their own, anywhere
                 the cluster has room: on a node added for them), without the pool's lock, so a rebalance can
                 run while the scaling waits for a node; then they start and load their experts of the new
                 version (the plan is made once the room is there, from the placement of that moment)
    3. stage     the actors that stay load their new experts beside the current ones (``ExpertActor.stage``,
                 on the control thread): decode goes on with the current version meanwhile
    4. switch    ``publish`` hands the new placement and actor list to every coordinator, which switches
                 its dispatch between two steps, and returns once all have (``RemoteExperts.switch``)
    5. drain     shrinking: no coordinator sends the removed actors work any more, so they are stopped and
                 their placement group freed; the actors that stay drop the old version

Indices stay dense: growing appends actors N..N2-1, shrinking removes the highest ones. If the new actors
cannot be placed or started, nothing has changed and ``ScaleError`` says why. One scaling runs at a time;
steps 1 and 3-5 hold the lock the pool's rebalancer shares. Outputs do not change: an
expert's output does not depend on which actor computes it.

The plan balances the number of experts per actor per layer (replica counts are kept, up to N2); a rebalance
afterwards balances by measured load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from moeshard.actors.placement import ExpertPlacement, PlacementError
from moeshard.actors.pool.expert_pool import ExpertPool, ReservedActors, add_actors, release_actors, reserve_actors
from moeshard.actors.rebalance.live import retire_versions, stage_placement
from moeshard.actors.transport import ActorRef
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)

Publish = Callable[[ExpertPlacement, list[ActorRef]], bool]  # switch every coordinator; True once all have


class ScaleBusy(RuntimeError):
    """A scaling or rebalance of this pool is already running."""


class ScaleError(RuntimeError):
    """The pool could not be scaled; it serves as before."""


@dataclass(frozen=True)
class ScaleReport:
    expert_actors_before: int
    expert_actors: int  # actors serving afterwards
    version: int  # the placement version in use afterwards
    switched: bool  # every coordinator dispatches with the new placement (False: no change, or one lagged)
    seconds: float
    started: list[int]  # actors started
    stopped: list[int]  # actors drained and stopped
    moved: int  # (layer, expert, actor) replicas that are new
    bytes_loaded: int  # expert weights the actors that stay read from checkpoints (new actors read all of theirs)
    failed_actors: list[int]  # actors that did not stage (they load the version when they are back)

    def to_dict(self) -> dict:
        return asdict(self)


def check_actor_count(num_actors: int) -> None:
    if num_actors < 1:
        raise PlacementError(f"need at least one expert actor, got {num_actors}")


def plan_scale(current: ExpertPlacement, num_actors: int) -> ExpertPlacement:
    """The next placement over ``num_actors`` actors: per layer, the removed actors' replicas go to the actors
    with the fewest experts, then experts move from the fullest actor to the emptiest until they differ by at
    most one. Each replica keeps its share of its expert's tokens."""
    check_actor_count(num_actors)
    hosts, shares = [], []
    for layer, experts in enumerate(current.hosts):
        layer_hosts = [list(actors) for actors in experts]
        layer_shares = [list(split) for split in current.shares_of(layer)] if experts else []
        _rehome(layer_hosts, layer_shares, num_actors)
        _even_out(layer_hosts, num_actors)
        hosts.append(tuple(tuple(a) for a in layer_hosts))
        shares.append(tuple(tuple(s) for s in layer_shares))
    return ExpertPlacement(
        num_actors=num_actors,
        hosts=tuple(hosts),
        shares=tuple(shares) if current.shares is not None else None,
        version=current.version + 1,
    )


def _counts(hosts: list[list[int]], num_actors: int) -> list[int]:
    counts = [0] * num_actors
    for actors in hosts:
        for a in actors:
            if a < num_actors:
                counts[a] += 1
    return counts


def _rehome(hosts: list[list[int]], shares: list[list[float]], num_actors: int) -> None:
    """Replace every host >= num_actors by the actor with the fewest experts that does not host the expert yet;
    an expert with more replicas than actors loses the extra ones, and their shares go to the others."""
    for e, actors in enumerate(hosts):
        for i, a in enumerate(actors):
            if a < num_actors:
                continue
            counts = _counts(hosts, num_actors)
            free = [b for b in range(num_actors) if b not in actors]
            actors[i] = min(free, key=lambda b: (counts[b], b)) if free else -1
        if -1 in actors:
            kept = [i for i, a in enumerate(actors) if a >= 0]
            total = sum(shares[e][i] for i in kept)
            shares[e] = [shares[e][i] / total if total > 0 else 1.0 / len(kept) for i in kept]
            hosts[e] = [actors[i] for i in kept]


def _even_out(hosts: list[list[int]], num_actors: int) -> None:
    """Move experts from the fullest actor to the emptiest (the highest expert id it can take) while their
    counts differ by more than one."""
    while hosts:
        counts = _counts(hosts, num_actors)
        full = max(range(num_actors), key=lambda a: (counts[a], -a))
        empty = min(range(num_actors), key=lambda a: (counts[a], a))
        if counts[full] - counts[empty] <= 1:
            return
        movable = [e for e, actors in enumerate(hosts) if full in actors and empty not in actors]
        if not movable:
            return
        actors = hosts[movable[-1]]
        actors[actors.index(full)] = empty


class PoolScaler:
    """Scales one pool; one scaling at a time. ``publish`` switches the coordinators (see the module doc)."""

    def __init__(self, pool: ExpertPool, publish: Publish, timeout_s: float, lock: threading.Lock | None = None):
        self.pool = pool
        self.publish = publish
        self.timeout_s = timeout_s
        self.lock = lock or threading.Lock()  # held while the placement changes; the pool's rebalancer shares it
        self._scaling = threading.Lock()  # held for a whole scaling, also while it waits for room
        self.last: ScaleReport | None = None

    def scale(self, expert_actors: int) -> ScaleReport:
        if self.lock.locked() or not self._scaling.acquire(blocking=False):
            raise ScaleBusy("the expert pool is already being scaled or rebalanced")
        try:
            report = self._scale(expert_actors)
        finally:
            self._scaling.release()
        self.last = report
        return report

    def _scale(self, expert_actors: int) -> ScaleReport:
        started_at = time.monotonic()
        before = self.pool.placement.num_actors  # only a scaling changes it, and this one holds ``_scaling``
        if expert_actors == before:
            current = self.pool.placement
            return ScaleReport(before, before, current.version, False, 0.0, [], [], 0, 0, [])
        check_actor_count(expert_actors)  # before any room is reserved
        reserved = None
        if expert_actors > before:
            try:
                reserved = reserve_actors(self.pool, range(before, expert_actors))  # 2. start: room first, unlocked
            except Exception as exc:
                raise ScaleError(f"could not start {expert_actors - before} expert actors: {one_line(exc)}") from exc
        if not self.lock.acquire(timeout=self.pool.config.cluster.startup_timeout_s):
            if reserved is not None:
                release_actors(reserved)
            raise ScaleBusy("the expert pool was being rebalanced for longer than startup_timeout_s")
        try:
            return self._switch(before, expert_actors, reserved, started_at)
        finally:
            self.lock.release()

    def _switch(self, before: int, expert_actors: int, reserved: ReservedActors | None, started_at: float) -> ScaleReport:
        pool, current = self.pool, self.pool.placement
        target = plan_scale(current, expert_actors)  # 1. plan, from the placement now (a rebalance may have run)
        try:
            added = add_actors(pool, target, reserved) if reserved is not None else []  # 2. start the actors
        except Exception as exc:
            raise ScaleError(f"could not start {expert_actors - before} expert actors: {one_line(exc)}") from exc
        stayed = range(min(before, expert_actors))
        staged, failed = self.stage(target, stayed)  # 3. stage
        actors = [pool.actors[a] for a in stayed] + added
        switched = self.publish(target, actors)  # 4. switch
        if not switched:
            logger.warning("scaling: not every coordinator switched to placement %d within %.0fs", target.version, self.timeout_s)
        removed = pool.actors[expert_actors:]
        pool.placement, pool.actors[:] = target, actors
        self.retire(target.version, stayed)  # 5. drain
        pool.stop_actors(removed)
        moved = sum(
            1
            for layer, experts in enumerate(target.hosts)
            for e, hosts in enumerate(experts)
            for a in hosts
            if a not in current.hosts[layer][e]
        )
        report = ScaleReport(
            expert_actors_before=before,
            expert_actors=expert_actors,
            version=target.version,
            switched=switched,
            seconds=time.monotonic() - started_at,
            started=[a.index for a in added],
            stopped=[a.index for a in removed],
            moved=moved,
            bytes_loaded=sum(r["bytes_loaded"] for r in staged.values()),
            failed_actors=failed,
        )
        logger.info("scaled the expert pool from %d to %d actors in %.2fs (placement %d, %d replicas moved)",
                    before, expert_actors, report.seconds, target.version, moved)  # fmt: skip
        return report

    def stage(self, target: ExpertPlacement, stayed: range) -> tuple[dict[int, dict], list[int]]:
        return stage_placement([self.pool.actors[a] for a in stayed], target, self.timeout_s, "scaling")

    def retire(self, version: int, stayed: range) -> None:
        retire_versions([self.pool.actors[a] for a in stayed], version, self.timeout_s, "scaling")
