"""The expert actors' balance in /metrics: rows per actor per step, imbalance per layer, the last rebalance."""

from __future__ import annotations

import torch

from moeshard.cluster.engine.async_engine import EngineStats
from moeshard.deploy.metrics import ServerMetrics

STATS = EngineStats(waiting=0, running=1, kv_used_blocks=1, kv_total_blocks=4)


def _balance(last: dict | None) -> dict:
    return {
        "placement_version": 1 if last else 0,
        "slots_per_actor": [3, 3],
        "window": {"steps": 10, "seconds": 1.0, "rows_per_step": [12.5, 3.0], "imbalance": [1.61, 0.0], "expected_imbalance": [1.6, 0.0]},
        "rebalances": 1 if last else 0,
        "last_rebalance": last,
    }


def test_balance_gauges_are_rendered():
    metrics = ServerMetrics()
    text = metrics.render(STATS, torch.zeros(2, 8, dtype=torch.int64), balance=_balance(None)).decode()
    assert 'moeshard_expert_actor_rows_per_step{actor="0"} 12.5' in text
    assert 'moeshard_expert_actor_imbalance{layer="0"} 1.61' in text
    assert "moeshard_rebalances 0.0" in text

    last = {"imbalance_before": [1.9, 1.2], "imbalance_after": [1.02, 1.0], "seconds": 0.75, "bytes_loaded": 38400}
    text = metrics.render(STATS, torch.zeros(2, 8, dtype=torch.int64), balance=_balance(last)).decode()
    assert 'moeshard_rebalance_imbalance{layer="0",when="before"} 1.9' in text
    assert 'moeshard_rebalance_imbalance{layer="0",when="after"} 1.02' in text
    assert "moeshard_rebalance_seconds 0.75" in text
    assert "moeshard_rebalance_bytes_loaded 38400.0" in text
    assert "moeshard_rebalances 1.0" in text
