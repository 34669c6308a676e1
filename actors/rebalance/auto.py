"""Automatic rebalancing, off by default (``cluster.auto_rebalance_s``): a thread that looks at the load window
every interval and rebalances when it is worth it.

A window is due when it has seen ``min_steps`` steps, some layer's expected imbalance under the measured
load (max / mean of the actors' choices) is at least ``threshold``, and the plan for that load would bring
the worst layer down by at least ``min_gain``: a skew that no placement can fix (one expert taking most
choices, no spare slots) does not trigger a rebalance every interval.
"""

from __future__ import annotations

import logging
import threading

from moeshard.actors.rebalance.live import RebalanceBusy, Rebalancer
from moeshard.actors.rebalance.meter import LoadWindow
from moeshard.actors.rebalance.plan import plan_rebalance
from moeshard.cluster.engine.config import ClusterConfig

logger = logging.getLogger(__name__)


def is_due(rebalancer: Rebalancer, window: LoadWindow, threshold: float, min_steps: int, min_gain: float = 0.05) -> bool:
    if window.steps < min_steps or window.expert_choices.sum() == 0:
        return False
    plan = plan_rebalance(rebalancer.experts.placement, window.expert_choices, rebalancer.slots)
    worst_before, worst_after = max(plan.before), max(plan.after)
    return worst_before >= threshold and worst_after <= worst_before * (1.0 - min_gain)


class AutoRebalancer:
    """Every ``interval_s``: rebalance if the window is due (``is_due``)."""

    def __init__(self, rebalancer: Rebalancer, interval_s: float, threshold: float, min_steps: int):
        self.rebalancer = rebalancer
        self.interval_s, self.threshold, self.min_steps = interval_s, threshold, min_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auto-rebalance", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if is_due(self.rebalancer, self.rebalancer.experts.meter.window(), self.threshold, self.min_steps):
                    report = self.rebalancer.rebalance()
                    logger.info("automatic rebalance to placement %d", report.version)
            except RebalanceBusy:
                pass  # one asked for by hand is running
            except Exception:  # noqa: BLE001 - the thread must outlive one failed attempt
                logger.exception("automatic rebalance failed; trying again in %.0fs", self.interval_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)


def start_auto_rebalance(cluster: ClusterConfig, rebalancer: Rebalancer) -> AutoRebalancer | None:
    """The automatic rebalancer the config asks for, running; None when ``auto_rebalance_s`` is unset."""
    if cluster.auto_rebalance_s is None:
        return None
    return AutoRebalancer(rebalancer, cluster.auto_rebalance_s, cluster.auto_rebalance_threshold, cluster.auto_rebalance_min_steps)
