"""Rebalancing while serving: a new placement from the load measured since the last one, switched in live.

    1. measure   the dispatch's load window (choices per expert, rows per actor), closed and reopened
    2. plan      ``plan.plan_rebalance``: replicas of the hottest experts in the spare slots, actors balanced
    3. stage     every actor loads its experts of the new version beside the current ones, on its control
                 thread (``ExpertActor.stage``): decode goes on with the current version meanwhile
    4. switch    once every actor has confirmed, the dispatch takes the new placement and tables between
                 two steps (``RemoteExperts.switch``)
    5. retire    the actors drop the stacks of the old version

An actor that fails while staging is not waited for: the switch goes ahead, and the dispatch's probe
(``ExpertActor.adopt``) loads the new version when Ray has restarted it, before it takes work again;
an actor that restarted without anyone noticing answers its first batch ``stale`` and takes that path.
Outputs do not change: an expert's output does not depend on which actor computes it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field

import ray

from moeshard.actors.dispatch import RemoteExperts
from moeshard.actors.expert_actor import CONTROL_GROUP
from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.rebalance.plan import expected_load, imbalance, plan_rebalance
from moeshard.actors.transport import ActorRef
from moeshard.cluster.errors import one_line

logger = logging.getLogger(__name__)


class RebalanceBusy(RuntimeError):
    """A rebalance is already running."""


@dataclass(frozen=True)
class RebalanceReport:
    version: int  # the placement version in use afterwards
    switched: bool  # the dispatch uses the new version (False: no load measured yet, or the switch timed out)
    seconds: float  # from the call to the old version's retirement
    bytes_loaded: int  # expert weights read from checkpoints, all actors
    moved: int  # (layer, expert, actor) replicas that are new
    steps: int  # steps in the window the plan came from
    imbalance_before: list[float]  # [L] max/mean of expected actor load, old layout, the measured load
    imbalance_after: list[float]  # [L] the same for the new layout
    measured_imbalance: list[float]  # [L] max/mean of the rows the actors were sent in the window
    rows_per_step: list[float]  # [A] rows per actor per step in the window
    weight_bytes: list[int | None]  # [A] expert weights each actor holds afterwards (None: it did not answer)
    failed_actors: list[int]  # actors that did not stage (they load the version when they are back)
    placement: ExpertPlacement = field(repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("placement")
        return out


class Rebalancer:
    """Plans and applies rebalances of one coordinator's dispatch; one at a time."""

    def __init__(self, experts: RemoteExperts, timeout_s: float):
        self.experts = experts
        self.timeout_s = timeout_s
        self._slots = _slots(experts.placement)  # capacity: what each actor started with
        self.last: RebalanceReport | None = None
        self.count = 0
        self.lock = threading.Lock()  # held while rebalancing; a scaling asked of this coordinator takes it too

    @property
    def slots(self) -> tuple[int, ...]:
        """Experts each actor holds per layer: as it started, or as the last scaling of the pool left it."""
        if len(self._slots) != self.experts.placement.num_actors:
            self._slots = _slots(self.experts.placement)
        return self._slots

    def rebalance(self) -> RebalanceReport:
        if not self.lock.acquire(blocking=False):
            raise RebalanceBusy("a rebalance is already running")
        try:
            report = self._rebalance()
        finally:
            self.lock.release()
        self.last, self.count = report, self.count + 1
        return report

    def _rebalance(self) -> RebalanceReport:
        started = time.monotonic()
        window = self.experts.meter.window(reset=True)  # 1. measure
        current = self.experts.placement
        plan = plan_rebalance(current, window.expert_choices, self.slots)  # 2. plan
        measured = dict(steps=window.steps, measured_imbalance=window.imbalance(), rows_per_step=window.rows_per_step())
        if window.expert_choices.sum() == 0:
            logger.info("rebalance: no load measured since the last one; placement %d stays", current.version)
            return self._report(current, False, started, 0, 0, plan.before, plan.before, [], measured)
        staged, failed = self._stage(plan.placement)  # 3. stage
        logger.info("rebalance: placement %d staged after %.2fs; switching", plan.placement.version, time.monotonic() - started)
        switched = self.experts.switch(plan.placement, self.timeout_s)  # 4. switch
        if not switched:
            logger.warning("rebalance: placement %d staged but not switched within %.0fs", plan.placement.version, self.timeout_s)
        weight_bytes = self._retire(plan.placement.version) if switched else [None] * current.num_actors  # 5. retire
        bytes_loaded = sum(r["bytes_loaded"] for r in staged.values())
        report = self._report(
            plan.placement, switched, started, bytes_loaded, plan.moved, plan.before, plan.after, failed, measured, weight_bytes
        )
        logger.info(
            "rebalanced to placement %d in %.2fs: %d replicas moved, %d bytes loaded, imbalance %.2f -> %.2f",
            report.version, report.seconds, plan.moved, bytes_loaded, _worst(plan.before), _worst(plan.after),
        )  # fmt: skip
        return report

    def _stage(self, placement: ExpertPlacement) -> tuple[dict[int, dict], list[int]]:
        return stage_placement(self.experts.actors, placement, self.timeout_s, "rebalance")

    def _retire(self, version: int) -> list[int | None]:
        return retire_versions(self.experts.actors, version, self.timeout_s, "rebalance")

    def _report(self, placement, switched, started, bytes_loaded, moved, before, after, failed, measured, weight_bytes=None):
        return RebalanceReport(
            version=placement.version if switched else self.experts.placement.version,
            switched=switched,
            seconds=time.monotonic() - started,
            bytes_loaded=bytes_loaded,
            moved=moved,
            imbalance_before=list(before),
            imbalance_after=list(after),
            failed_actors=failed,
            weight_bytes=weight_bytes if weight_bytes is not None else [None] * placement.num_actors,
            placement=placement if switched else self.experts.placement,
            **measured,
        )

    def status(self) -> dict:
        """What ``/v1/experts`` and ``/metrics`` show: the current window, the slots and the last rebalance."""
        window = self.experts.meter.window()
        return {
            "placement_version": self.experts.placement.version,
            "slots_per_actor": list(self.slots),
            "window": {
                "steps": window.steps,
                "seconds": round(window.seconds, 3),
                "rows_per_step": window.rows_per_step(),
                "imbalance": window.imbalance(),
                "expected_imbalance": _expected_imbalance(self.experts.placement, window.expert_choices),
            },
            "rebalances": self.count,
            "last_rebalance": self.last.to_dict() if self.last is not None else None,
        }


def stage_placement(actors: list[ActorRef], placement: ExpertPlacement, timeout_s: float, purpose: str) -> tuple[dict[int, dict], list[int]]:
    """Every one of ``actors`` loads its experts of ``placement`` beside the ones in use (on its control thread):
    {actor: StageReport dict} of those that did within ``timeout_s``, and the others (they catch up through the
    dispatch's probe)."""
    refs = {
        a.index: a.handle.stage.options(concurrency_group=CONTROL_GROUP).remote(
            placement.version, placement.hosted_by(a.index), placement.shares_held_by(a.index)
        )
        for a in actors
    }
    staged, failed = {}, []
    deadline = time.monotonic() + timeout_s
    for actor, ref in refs.items():
        try:
            staged[actor] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - the actor catches up through the dispatch's probe
            logger.warning("%s: expert actor %d did not stage placement %d: %s", purpose, actor, placement.version, one_line(exc))
            failed.append(actor)
    return staged, failed


def retire_versions(actors: list[ActorRef], keep: int, timeout_s: float, purpose: str) -> list[int | None]:
    """Every one of ``actors`` drops the versions but ``keep``: the weight bytes each still holds (None: no answer)."""
    refs = [a.handle.retire.options(concurrency_group=CONTROL_GROUP).remote(keep) for a in actors]
    held: list[int | None] = []
    for actor, ref in zip(actors, refs):
        try:
            held.append(ray.get(ref, timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - a dead actor holds nothing; restarted, it adopts the version
            logger.warning("%s: expert actor %d did not retire old placements: %s", purpose, actor.index, one_line(exc))
            held.append(None)
    return held


def _expected_imbalance(placement: ExpertPlacement, load) -> list[float]:
    """[L] max / mean of the actors' expected choices under ``load`` [L, E] and the placement's shares."""
    out = []
    for layer, hosts in enumerate(placement.hosts):
        if not hosts:
            out.append(0.0)
            continue
        layer_load = [float(x) for x in load[layer, : len(hosts)]]
        out.append(imbalance(expected_load(layer_load, hosts, placement.shares_of(layer), placement.num_actors)))
    return out


def _slots(placement: ExpertPlacement) -> tuple[int, ...]:
    return tuple(placement.slots_of(a) for a in range(placement.num_actors))


def _worst(values) -> float:
    return max(values, default=0.0)
