"""Which expert actors can take work now: each is up, or down and being restarted by Ray.

The dispatch marks an actor down when a call to it fails or times out, and
routes around it while live replicas of its experts exist. A probe (by default a call to
``ready``, which Ray queues until the restarted actor has reloaded its experts; the dispatch's
probe also brings the actor to the current placement)
tells when it is back; ``refresh`` takes back recovered actors without blocking,
``wait_for`` blocks for one, bounded by a deadline.

Read from other threads (health checks, metrics): ``snapshot`` copies under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from moeshard.actors.transport import ActorRef
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)

RETRY_PROBE_S = 0.2  # between probes of an actor whose probe failed (Ray had not yet seen it die)


@dataclass
class _Recovery:
    since: float  # monotonic time the actor was marked down
    probe: object  # ObjectRef of ready() on the (restarting) actor


@dataclass(frozen=True)
class HealthSnapshot:
    down_since: dict[int, float]  # actor -> seconds it has been down
    failures: tuple[int, ...]  # per actor: times marked down since start
    retries: int  # dispatches resent after a failure
    recovery_seconds: tuple[float, ...]  # each finished recovery, in order


def _ready(actor: ActorRef):
    return actor.handle.ready.remote()


@dataclass
class ActorHealth:
    actors: list[ActorRef]
    probe: Callable[[ActorRef], object] = _ready  # an ObjectRef that resolves once the actor can take work again
    failures: list[int] = field(init=False)
    retries: int = 0
    recovery_seconds: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.failures = [0] * len(self.actors)
        self._down: dict[int, _Recovery] = {}
        self._lock = threading.Lock()

    @property
    def down(self) -> frozenset[int]:
        return frozenset(self._down)

    def mark_down(self, actor: int, cause: BaseException) -> None:
        if actor in self._down or actor >= len(self.actors):  # gone with a scaled-down pool: nothing to wait for
            return
        logger.warning("%s failed (%s); routing around it until Ray restarts it", self.actors[actor].description, one_line(cause))
        with self._lock:
            self.failures[actor] += 1
            self._down[actor] = _Recovery(time.monotonic(), self.probe(self.actors[actor]))

    def resize(self, num_actors: int) -> None:
        """The pool was scaled: count failures for ``num_actors`` actors; removed actors are no longer down."""
        with self._lock:
            self.failures = (self.failures + [0] * num_actors)[:num_actors]
            self._down = {a: r for a, r in self._down.items() if a < num_actors}

    def refresh(self) -> None:
        """Take back every down actor whose probe has answered (never blocks)."""
        for actor, recovery in list(self._down.items()):
            done, _ = ray.wait([recovery.probe], timeout=0)
            if done:
                self._settle(actor, recovery)

    def wait_for(self, actor: int, deadline: float) -> bool:
        """Block until ``actor`` is back (True) or ``deadline`` (monotonic) passes (False)."""
        while actor in self._down:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            recovery = self._down[actor]
            done, _ = ray.wait([recovery.probe], timeout=min(remaining, 1.0))
            if done and not self._settle(actor, recovery):
                time.sleep(min(RETRY_PROBE_S, max(0.0, deadline - time.monotonic())))
        return True

    def _settle(self, actor: int, recovery: _Recovery) -> bool:
        """An answered probe: back up if it succeeded, else probe again. True if the actor is up."""
        try:
            ray.get(recovery.probe, timeout=0)
        except (RayActorError, GetTimeoutError) as exc:
            logger.debug("%s not back yet: %s", self.actors[actor].description, one_line(exc))
            recovery.probe = self.probe(self.actors[actor])
            return False
        took = time.monotonic() - recovery.since
        with self._lock:
            self._down.pop(actor, None)
            self.recovery_seconds.append(took)
        logger.warning("%s is back after %.1fs", self.actors[actor].description, took)
        return True

    def snapshot(self) -> HealthSnapshot:
        now = time.monotonic()
        with self._lock:
            return HealthSnapshot(
                down_since={a: now - r.since for a, r in self._down.items()},
                failures=tuple(self.failures),
                retries=self.retries,
                recovery_seconds=tuple(self.recovery_seconds),
            )
