"""A shared expert pool: a named, detached service that several coordinators attach to and that outlives them.

With ``cluster.pool_name`` set, the expert actors belong to a small manager actor, ``ExpertPoolService``,
named ``pool_name`` in the ``moeshard`` namespace and detached from whoever started it. The first
coordinator to ask starts it (and so the pool: placement group, actors, weights); every other one, and a
coordinator that Serve restarted after a crash, attaches to the running pool. Nothing is reloaded, and
the pool keeps serving the other coordinators meanwhile.

Coordinators check in while they live (``attach``, then ``check_in`` twice a second). The pool stops when asked
(``stop_expert_pool``, or ``moeshard serve`` on its way out), or by itself once no coordinator has checked
in for ``pool_idle_timeout_s``: a deleted application does not leave its experts behind, while a rolling
update, whose new replicas attach within seconds, keeps them.

A coordinator attaching with settings the pool was not started with (another model, dtype, actor count or
placement) is refused with one line rather than served wrong experts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray

from moeshard.actors.dispatch import RemoteExperts
from moeshard.actors.placement import ExpertPlacement, PlacementError
from moeshard.actors.pool.expert_pool import POOL_NAMESPACE, ExpertPool, start_expert_pool
from moeshard.actors.pool.recovery import recover_expert_pool
from moeshard.actors.rebalance.auto import start_auto_rebalance
from moeshard.actors.rebalance.live import RebalanceBusy, Rebalancer, RebalanceReport
from moeshard.actors.rebalance.meter import LoadDelta, LoadMeter
from moeshard.actors.rebalance.scale import PoolScaler, ScaleBusy, ScaleError
from moeshard.actors.transport import ActorRef
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.config import ModelConfig

logger = logging.getLogger(__name__)

CHECK_IN_S = 0.5  # how often an attached coordinator checks in and looks for a new placement
LIVE_S = 10.0  # a coordinator not checked in for this long is taken for gone (not listed, not waited for)


class PoolMismatch(ValueError):
    """A coordinator asked for a pool under a name that serves something else."""


@dataclass(frozen=True)
class PoolLayout:
    placement: ExpertPlacement
    actors: list[ActorRef]  # actor i at position i


@dataclass(frozen=True)
class PoolAttachment:
    """What a coordinator needs of the pool to dispatch to it."""

    layout: PoolLayout
    group: object  # the pool's PlacementGroup
    coordinators: int  # coordinators attached, this one included


@dataclass
class _CheckIn:
    seen: float  # monotonic time of the last check-in
    version: int | None  # the placement version its dispatch uses; None: it does not dispatch (an offline driver)


class ExpertPoolService:
    """The manager actor of a shared pool (see the module doc); its methods run on a few threads.

    It owns the placement: ``scale`` grows or shrinks the pool (actors/rebalance/scale.py) and ``rebalance``
    re-places its experts from the load all coordinators report with their check-ins (actors/rebalance/live.py);
    either publishes the new layout, which every coordinator picks up on its next check-in and switches to
    between two steps. One of them runs at a time."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.signature = config.pool_signature()
        self.idle_timeout_s = config.cluster.pool_idle_timeout_s
        self.switch_timeout_s = config.cluster.recovery_timeout_s + config.cluster.dispatch_timeout_s
        recovered = recover_expert_pool(config, model_config)  # Ray restarted this manager: the pool is still there
        self.pool = recovered.pool if recovered is not None else start_expert_pool(config, model_config)
        self._published = PoolLayout(self.pool.placement, list(self.pool.actors))
        self._seen: dict[str, _CheckIn] = {}
        self._changed = threading.Condition()  # guards _seen and _published
        placement = self.pool.placement
        self.meter = LoadMeter(placement.num_layers, placement.num_experts, placement.num_actors, time.monotonic)
        self.rebalancer = Rebalancer(_PoolDispatch(self), self.switch_timeout_s)  # over every coordinator's load
        self.scaler = PoolScaler(self.pool, self._publish, self.switch_timeout_s, lock=self.rebalancer.lock)
        self.auto = start_auto_rebalance(config.cluster, self.rebalancer)  # None unless cluster.auto_rebalance_s
        if recovered is not None and not recovered.consistent:  # it died in the middle of a change: finish one
            self.scaler.stage(self.pool.placement, range(len(self.pool.actors)))
            threading.Thread(target=self._retire_when_switched, name="pool-recovery", daemon=True).start()
        self._last_attached = time.monotonic()
        self._stopped = False
        threading.Thread(target=self._watch_idle, name="pool-idle", daemon=True).start()
        logger.info("expert pool up: %d actors", len(self.pool.actors))

    def attach(self, coordinator: str, signature: dict) -> PoolAttachment:
        if signature != self.signature:
            differ = sorted(k for k in signature if signature[k] != self.signature.get(k))
            raise PoolMismatch(f"this pool was started with other settings ({', '.join(differ)}): {self.signature}")
        with self._changed:
            self._seen[coordinator] = _CheckIn(time.monotonic(), None)
            count = len(self._seen)
            layout = self._published
        logger.info("coordinator %s attached (%d attached)", coordinator, count)
        return PoolAttachment(layout, self.pool.group, count)

    def check_in(self, coordinator: str, version: int | None, load: LoadDelta | None = None) -> int:
        """A coordinator is alive, dispatches with placement ``version`` and counted ``load`` since it last
        checked in; the version it should use."""
        with self._changed:
            self._seen[coordinator] = _CheckIn(time.monotonic(), version)
            self._changed.notify_all()
            current = self._published.placement.version
        if load is not None and version == current:  # counted under another placement: not this window's
            self.meter.add(load)
        return current

    def layout(self) -> PoolLayout:
        with self._changed:
            return self._published

    def detach(self, coordinator: str) -> int:
        """Forget a coordinator that is going away; returns how many stay attached. The pool stays up."""
        with self._changed:
            self._seen.pop(coordinator, None)
            self._changed.notify_all()
            return len(self._seen)

    def coordinators(self) -> list[str]:
        """The coordinators dispatching to the pool that checked in within ``LIVE_S``."""
        cutoff = time.monotonic() - LIVE_S
        with self._changed:
            return sorted(c for c, seen in self._seen.items() if seen.seen >= cutoff and seen.version is not None)

    def scale(self, expert_actors: int) -> dict:
        """Grow or shrink the pool to ``expert_actors`` while the coordinators serve; a ``ScaleReport`` as a dict."""
        return self.scaler.scale(expert_actors).to_dict()

    def rebalance(self) -> RebalanceReport:
        """Rebalance the pool from the load every coordinator measured since the last rebalance."""
        return self.rebalancer.rebalance()

    def balance(self) -> dict:
        """The pool's load window (all coordinators) and its last rebalance (``Rebalancer.status``)."""
        return self.rebalancer.status()

    def _publish(self, placement: ExpertPlacement, actors: list[ActorRef]) -> bool:
        """Hand the coordinators the new layout; True once every live one dispatches with it."""
        deadline = time.monotonic() + self.switch_timeout_s
        if len(actors) != len(self._published.actors):
            self.meter.resize(len(actors))  # a new window over the scaled pool
        with self._changed:
            self._published = PoolLayout(placement, list(actors))
            return self._changed.wait_for(lambda: not self._lagging(placement.version), timeout=max(0.0, deadline - time.monotonic()))

    def _retire_when_switched(self) -> None:
        """After a recovery that staged a new version: once the coordinators (given a few check-ins to come back)
        all dispatch with it, the actors drop the versions left from the change that was cut short."""
        version = self._published.placement.version
        time.sleep(6 * CHECK_IN_S)
        with self._changed:
            self._changed.wait_for(lambda: not self._lagging(version), timeout=self.switch_timeout_s)
        with self.scaler.lock:
            self.scaler.retire(version, range(len(self.pool.actors)))

    def _lagging(self, version: int) -> list[str]:
        cutoff = time.monotonic() - LIVE_S
        return [c for c, seen in self._seen.items() if seen.version is not None and seen.seen >= cutoff and seen.version < version]

    def ready(self) -> bool:
        return True

    def stop(self) -> None:
        """Kill the expert actors and free their placement groups; the manager exits right after."""
        with self._changed:
            if self._stopped:
                return
            self._stopped = True
        if self.auto is not None:
            self.auto.close()
        self.pool.shutdown()
        logger.info("expert pool stopped")

    def _watch_idle(self) -> None:
        while not self._stopped:
            time.sleep(min(LIVE_S, self.idle_timeout_s / 2))
            cutoff = time.monotonic() - LIVE_S
            with self._changed:
                live = any(seen.seen >= cutoff for seen in self._seen.values())
                if live:
                    self._last_attached = time.monotonic()
                idle_for = time.monotonic() - self._last_attached
            if idle_for > self.idle_timeout_s:
                logger.warning("no coordinator for %.0fs: stopping the expert pool", idle_for)
                self.stop()
                # The manager goes too, for good (Ray would restart a crashed one), and its name is free again.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


class _PoolDispatch:
    """What a ``Rebalancer`` needs of a dispatch, for the pool as a whole: its placement and actors, the load
    all coordinators measured, and a switch that publishes the placement to every coordinator."""

    def __init__(self, service: ExpertPoolService):
        self.service = service

    @property
    def placement(self) -> ExpertPlacement:
        return self.service.pool.placement

    @property
    def actors(self) -> list[ActorRef]:
        return self.service.pool.actors

    @property
    def meter(self) -> LoadMeter:
        return self.service.meter

    def switch(self, placement: ExpertPlacement, timeout_s: float) -> bool:
        switched = self.service._publish(placement, self.service.pool.actors)
        self.service.pool.placement = placement
        return switched


class SharedExpertPool(ExpertPool):
    """A coordinator's view of a shared pool: health and placement as for its own pool, but ``shutdown``
    only detaches (the pool goes on serving the other coordinators).

    It checks in every ``CHECK_IN_S``. Once it ``follow``s a dispatch, it reports the dispatch's placement
    version and, when the pool publishes a newer one (it was scaled), hands it to the dispatch, which switches
    between two steps. A view that follows nothing (an offline driver) reads the layout from the manager."""

    def __init__(self, config: EngineConfig, attachment: PoolAttachment, manager, coordinator: str):
        super().__init__(config, attachment.layout.placement, list(attachment.layout.actors), attachment.group)
        self.name = config.cluster.pool_name
        self.manager = manager
        self.coordinator = coordinator
        self.experts: RemoteExperts | None = None
        self._closed = threading.Event()
        self._reporting = threading.Lock()  # one check-in at a time: the loop's, or one asked for (a rebalance's)
        self._asked = -1  # the newest published version handed to the dispatch
        threading.Thread(target=self._check_in, name="pool-check-in", daemon=True).start()

    def follow(self, experts: RemoteExperts) -> None:
        """Report ``experts``' placement version and switch it to each newer layout the pool publishes."""
        self.experts = experts

    def _check_in(self) -> None:
        failing = False
        while not self._closed.wait(CHECK_IN_S):
            try:
                self.report_load()
                failing = False
            except Exception as exc:  # noqa: BLE001 - the next check-in tries again
                if not failing:
                    logger.warning("expert pool check-in failed: %s", exc)
                failing = True

    def report_load(self) -> None:
        """Check in now: the placement version in use and the load counted since the last check-in go to the
        manager, and a newer layout it publishes is handed to the dispatch. Raises if the manager does not answer."""
        with self._reporting:
            experts = self.experts
            in_use = experts.placement.version if experts is not None else None
            load = experts.meter.take() if experts is not None else None  # lost if the check-in fails: a sample
            version = ray.get(self.manager.check_in.remote(self.coordinator, in_use, load), timeout=10)
            if experts is not None and version > in_use and version != self._asked:
                layout = ray.get(self.manager.layout.remote(), timeout=10)
                experts.switch(layout.placement, 0.0, layout.actors)  # taken between two steps
                self._asked = version

    def layout(self) -> tuple[ExpertPlacement, list[ActorRef]]:
        if self.experts is not None:
            return self.experts.layout()
        layout = ray.get(self.manager.layout.remote(), timeout=10)
        return layout.placement, layout.actors

    def coordinators(self, timeout_s: float = 5.0) -> list[str]:
        """The coordinators attached to the pool and checking in."""
        return ray.get(self.manager.coordinators.remote(), timeout=timeout_s)

    def scale(self, expert_actors: int) -> dict:
        """Grow or shrink the pool (see ``ExpertPoolService.scale``)."""
        return _answer(self.manager.scale.remote(expert_actors))

    def rebalance(self) -> RebalanceReport:
        """Rebalance the pool from every coordinator's load (see ``ExpertPoolService.rebalance``), this
        coordinator's counted up to now: the others' up to their last check-in, at most ``CHECK_IN_S`` ago."""
        if self.experts is not None:
            try:
                self.report_load()
            except Exception as exc:  # noqa: BLE001 - the manager answers for itself below
                logger.warning("reporting load before a rebalance: %s", exc)
        return _answer(self.manager.rebalance.remote())

    def balance(self, timeout_s: float = 10.0) -> dict:
        """The pool's load window and last rebalance."""
        return ray.get(self.manager.balance.remote(), timeout=timeout_s)

    def shutdown(self) -> None:
        self._closed.set()
        try:
            ray.get(self.manager.detach.remote(self.coordinator), timeout=10)
        except Exception as exc:  # noqa: BLE001 - a pool that is gone has nothing to detach from
            logger.warning("detaching from the expert pool: %s", exc)


class PoolManagerUnavailable(RuntimeError):
    """The pool's manager died during the call (Ray restarts it; the pool keeps serving)."""


def _answer(ref):
    """The manager's answer; its own refusals (busy, cannot place) are raised as themselves, without Ray's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (RebalanceBusy, ScaleBusy, ScaleError, PlacementError)):
            raise exc.cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise PoolManagerUnavailable(
            f"the expert pool's manager stopped during the call ({type(exc).__name__}); it is restarted and takes the "
            "pool back: check GET /v1/experts and try again"
        ) from None


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
            max_concurrency=8,  # check-ins go on while a scaling waits for the coordinators
            max_restarts=-1,  # a crashed manager comes back and takes its pool back (actors/pool/recovery.py)
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
