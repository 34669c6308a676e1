"""A shared expert pool: a named, detached service that several coordinators attach to and that outlives them.

With ``cluster.pool_name`` set, the expert actors belong to a small manager actor, ``ExpertPoolService``,
named ``pool_name`` in the ``moeshard`` namespace and detached from whoever started it. The first
coordinator to ask starts it (and so the pool: placement group, actors, weights); every other one, and a
coordinator that Serve restarted after a crash, attaches to the running pool. Nothing is reloaded, and
the pool keeps serving the other coordinators meanwhile.

Coordinators check in while they live (``attach``, then ``heartbeat``). The pool stops when asked
(``stop_expert_pool``, or ``moeshard serve`` on its way out), or by itself once no coordinator has checked
in for ``pool_idle_timeout_s``: a deleted application does not leave its experts behind, while a rolling
update, whose new replicas attach within seconds, keeps them.

A coordinator attaching with settings the pool was not started with (another model, dtype, actor count or
placement) is refused with one line rather than served wrong experts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import ray

from moeshard.actors.expert_pool import ExpertPool, start_expert_pool
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.transport import ActorRef
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.config import ModelConfig

logger = logging.getLogger(__name__)

POOL_NAMESPACE = "moeshard"
HEARTBEAT_S = 10.0  # how often an attached coordinator checks in


class PoolMismatch(ValueError):
    """A coordinator asked for a pool under a name that serves something else."""


@dataclass(frozen=True)
class PoolAttachment:
    """What a coordinator needs of the pool to dispatch to it."""

    placement: ExpertPlacement
    actors: list[ActorRef]
    group: object  # the pool's PlacementGroup
    coordinators: int  # coordinators attached, this one included


class ExpertPoolService:
    """The manager actor of a shared pool (see the module doc); its methods run on a few threads."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.signature = config.pool_signature()
        self.idle_timeout_s = config.cluster.pool_idle_timeout_s
        self.pool = start_expert_pool(config, model_config)
        self._seen: dict[str, float] = {}  # coordinator id -> last check-in (monotonic)
        self._lock = threading.Lock()
        self._last_attached = time.monotonic()
        self._stopped = False
        threading.Thread(target=self._watch_idle, name="pool-idle", daemon=True).start()
        logger.info("expert pool up: %d actors", len(self.pool.actors))

    def attach(self, coordinator: str, signature: dict) -> PoolAttachment:
        if signature != self.signature:
            differ = sorted(k for k in signature if signature[k] != self.signature.get(k))
            raise PoolMismatch(f"this pool was started with other settings ({', '.join(differ)}): {self.signature}")
        with self._lock:
            self._seen[coordinator] = time.monotonic()
            count = len(self._seen)
        logger.info("coordinator %s attached (%d attached)", coordinator, count)
        return PoolAttachment(self.pool.placement, self.pool.actors, self.pool.group, count)

    def heartbeat(self, coordinator: str) -> None:
        with self._lock:
            self._seen[coordinator] = time.monotonic()

    def detach(self, coordinator: str) -> int:
        """Forget a coordinator that is going away; returns how many stay attached. The pool stays up."""
        with self._lock:
            self._seen.pop(coordinator, None)
            return len(self._seen)

    def coordinators(self) -> list[str]:
        """The coordinators that checked in within the last three heartbeats."""
        cutoff = time.monotonic() - 3 * HEARTBEAT_S
        with self._lock:
            return sorted(c for c, seen in self._seen.items() if seen >= cutoff)

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        """Kill the expert actors and free their placement group; the manager exits right after."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.pool.shutdown()
        logger.info("expert pool stopped")

    def _watch_idle(self) -> None:
        while not self._stopped:
            time.sleep(min(HEARTBEAT_S, self.idle_timeout_s / 2))
            cutoff = time.monotonic() - 3 * HEARTBEAT_S
            with self._lock:
                live = any(seen >= cutoff for seen in self._seen.values())
                if live:
                    self._last_attached = time.monotonic()
                idle_for = time.monotonic() - self._last_attached
            if idle_for > self.idle_timeout_s:
                logger.warning("no coordinator for %.0fs: stopping the expert pool", idle_for)
                self.stop()
                os._exit(0)  # the manager goes too (it is not restarted), and its name is free again


class SharedExpertPool(ExpertPool):
    """A coordinator's view of a shared pool: health and placement as for its own pool, but ``shutdown``
    only detaches (the pool goes on serving the other coordinators)."""

    def __init__(self, config: EngineConfig, attachment: PoolAttachment, manager, coordinator: str):
        super().__init__(config, attachment.placement, attachment.actors, attachment.group)
        self.name = config.cluster.pool_name
        self.manager = manager
        self.coordinator = coordinator
        self._closed = threading.Event()
        threading.Thread(target=self._check_in, name="pool-heartbeat", daemon=True).start()

    def _check_in(self) -> None:
        while not self._closed.wait(HEARTBEAT_S):
            try:
                self.manager.heartbeat.remote(self.coordinator)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                logger.warning("expert pool heartbeat failed: %s", exc)

    def coordinators(self, timeout_s: float = 5.0) -> list[str]:
        """The coordinators attached to the pool and checking in."""
        return ray.get(self.manager.coordinators.remote(), timeout=timeout_s)

    def shutdown(self) -> None:
        self._closed.set()
        try:
            ray.get(self.manager.detach.remote(self.coordinator), timeout=10)
        except Exception as exc:  # noqa: BLE001 - a pool that is gone has nothing to detach from
            logger.warning("detaching from the expert pool: %s", exc)


def attach_expert_pool(config: EngineConfig, model_config: ModelConfig) -> ExpertPool:
    """The pool this coordinator dispatches to: its own (``pool_name`` unset), or the shared one of that name,
    started here if nobody has yet."""
    name = config.cluster.pool_name
    if name is None:
        return start_expert_pool(config, model_config)
    manager = (
        ray.remote(ExpertPoolService)
        .options(
            name=name,
            namespace=POOL_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=4,
            max_restarts=0,
        )
        .remote(config, model_config)
    )
    coordinator = ray.get_runtime_context().get_actor_id() or ray.get_runtime_context().get_worker_id()
    attachment = ray.get(manager.attach.remote(coordinator, config.pool_signature()), timeout=config.cluster.startup_timeout_s)
    logger.info("attached to expert pool %r (%d coordinators)", name, attachment.coordinators)
    return SharedExpertPool(config, attachment, manager, coordinator)


def stop_expert_pool(name: str, timeout_s: float = 60.0) -> bool:
    """Stop the shared pool ``name`` (its actors and placement group); False if there was none."""
    try:
        manager = ray.get_actor(name, namespace=POOL_NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(manager.stop.remote(), timeout=timeout_s)
    finally:
        ray.kill(manager, no_restart=True)
    return True
