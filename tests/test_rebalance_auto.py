"""Automatic rebalancing: when a load window is due, and the thread that acts on it (no Ray)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from moeshard.actors.placement import ExpertPlacement
from moeshard.actors.rebalance.auto import AutoRebalancer, is_due, start_auto_rebalance
from moeshard.actors.rebalance.meter import LoadWindow
from moeshard.actors.rebalance.plan import actor_slots, initial_placement
from moeshard.cluster.engine.config import ClusterConfig

SKEWED = [50.0, 50.0, 50.0, 50.0, 1000.0, 50.0, 50.0, 50.0]  # expert 4 has one slot to begin with


def _window(load: list[float], steps: int) -> LoadWindow:
    return LoadWindow(torch.tensor([load]), torch.zeros(1, 4, dtype=torch.int64), steps, 1.0)


def _rebalancer(placement: ExpertPlacement, slots: tuple[int, ...], window: LoadWindow | None = None, calls=None):
    meter = SimpleNamespace(window=lambda: window)
    experts = SimpleNamespace(placement=placement, meter=meter)

    def rebalance():
        calls.append(1)
        return SimpleNamespace(version=placement.version + 1)

    return SimpleNamespace(experts=experts, slots=slots, rebalance=rebalance)


def test_due_only_with_enough_steps_imbalance_and_a_plan_that_helps():
    spare = _rebalancer(initial_placement(1, 8, 4, redundant=4), actor_slots(8, 4, 4))
    assert is_due(spare, _window(SKEWED, steps=60), threshold=1.25, min_steps=50)
    assert not is_due(spare, _window(SKEWED, steps=10), threshold=1.25, min_steps=50)
    assert not is_due(spare, _window([100.0] * 8, steps=60), threshold=1.25, min_steps=50)  # balanced already
    assert not is_due(spare, _window(SKEWED, steps=60), threshold=5.0, min_steps=50)

    no_spare = _rebalancer(ExpertPlacement.even(1, 8, 4), actor_slots(8, 0, 4))
    one_hot = [1000.0, 0, 0, 0, 0, 0, 0, 0]  # no placement without replicas can spread one expert
    assert not is_due(no_spare, _window(one_hot, steps=60), threshold=1.25, min_steps=50)


def test_the_thread_rebalances_when_due_and_stops_on_close():
    calls: list[int] = []
    rebalancer = _rebalancer(initial_placement(1, 8, 4, redundant=4), actor_slots(8, 4, 4), _window(SKEWED, 60), calls)
    auto = AutoRebalancer(rebalancer, interval_s=0.01, threshold=1.25, min_steps=50)
    deadline = threading.Event()
    for _ in range(200):
        if calls:
            break
        deadline.wait(0.01)
    auto.close()
    assert calls, "no automatic rebalance"
    seen = len(calls)
    deadline.wait(0.05)
    assert len(calls) == seen  # stopped


def test_off_by_default_and_validated():
    assert start_auto_rebalance(ClusterConfig(), rebalancer=None) is None
    with pytest.raises(ValueError):
        ClusterConfig(auto_rebalance_s=0)
    with pytest.raises(ValueError):
        ClusterConfig(expert_actors=4, redundant_experts=2, expert_map={0: [0]})
    with pytest.raises(ValueError, match="at least 2 expert actors"):
        ClusterConfig(expert_actors=1, redundant_experts=2)
