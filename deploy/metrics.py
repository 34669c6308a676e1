"""Prometheus metrics of the server, in their own registry.

Label cardinality is bounded: requests by final status, and expert load by
(layer, expert) only while layers x experts stays under ``MAX_EXPERT_SERIES``;
beyond it, load is reported per layer as the max/mean ratio. The expert actors'
balance (rows per actor per step, imbalance per layer, the last rebalance) is
labelled by actor and by layer.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from moeshard.actors.actor_health import HealthSnapshot

MAX_EXPERT_SERIES = 2048
RECOVERY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends: the coordinator's own footprint
        self.coordinator_info = Gauge(
            "moeshard_coordinator_info", "This coordinator's id (1); each replica reports its own metrics", ["coordinator"], registry=r
        )
        self.requests = Counter("moeshard_requests", "Finished requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("moeshard_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("moeshard_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "moeshard_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "moeshard_time_per_output_token_seconds", "Time between output tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("moeshard_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("moeshard_running_requests", "Requests in the running batch", registry=r)
        self.kv_cache_usage = Gauge("moeshard_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.prefix_queries = Counter(
            "moeshard_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter("moeshard_prefix_cache_hits", "Prompt tokens found computed in the prefix cache", registry=r)
        self.prefix_hit_rate = Gauge(
            "moeshard_prefix_cache_hit_rate", "Fraction of looked-up prompt tokens found computed, since start", registry=r
        )
        self._prefix_seen = (0, 0)  # (queries, hits) already counted
        self.expert_tokens = Gauge(
            "moeshard_expert_tokens", "Tokens routed to each expert since start", ["layer", "expert"], registry=r
        )
        self.expert_imbalance = Gauge(
            "moeshard_expert_load_imbalance", "Per-layer max/mean of tokens per expert", ["layer"], registry=r
        )
        self.actor_failures = Counter(
            "moeshard_expert_actor_failures", "Times an expert actor died or timed out during dispatch", ["actor"], registry=r
        )
        self.dispatch_retries = Counter("moeshard_dispatch_retries", "MoE layer dispatches resent after a failure", registry=r)
        self.recovery_seconds = Histogram(
            "moeshard_expert_recovery_seconds", "From an expert actor's failure to its return", buckets=RECOVERY_BUCKETS, registry=r
        )
        self.actor_rows = Gauge(
            "moeshard_expert_actor_rows_per_step", "Rows sent to each expert actor per step, since the last rebalance", ["actor"], registry=r
        )
        self.actor_imbalance = Gauge(
            "moeshard_expert_actor_imbalance", "Per-layer max/mean of rows per expert actor, since the last rebalance", ["layer"], registry=r
        )
        self.rebalance_imbalance = Gauge(
            "moeshard_rebalance_imbalance",
            "Per-layer max/mean of expected rows per expert actor under the last rebalance's load, before and after it",
            ["layer", "when"],
            registry=r,
        )
        self.rebalances = Gauge("moeshard_rebalances", "Rebalances since start", registry=r)
        self.expert_actors = Gauge("moeshard_expert_actors", "Expert actors the coordinator dispatches to (changes when the pool is scaled)", registry=r)
        self.rebalance_seconds = Gauge("moeshard_rebalance_seconds", "Duration of the last rebalance", registry=r)
        self.rebalance_bytes = Gauge("moeshard_rebalance_bytes_loaded", "Expert bytes the last rebalance loaded", registry=r)
        self._seen = HealthSnapshot(down_since={}, failures=(), retries=0, recovery_seconds=())

    def _record_balance(self, balance: dict) -> None:
        """The rebalancer's status (``Rebalancer.status``): the current window and the last rebalance."""
        window = balance["window"]
        self.actor_rows.clear()  # a scaled-down pool has fewer actors
        self.expert_actors.set(len(window["rows_per_step"]))
        for actor, rows in enumerate(window["rows_per_step"]):
            self.actor_rows.labels(str(actor)).set(rows)
        for layer, ratio in enumerate(window["imbalance"]):
            self.actor_imbalance.labels(str(layer)).set(ratio)
        self.rebalances.set(balance["rebalances"])
        last = balance["last_rebalance"]
        if last is not None:
            for when in ("before", "after"):
                for layer, ratio in enumerate(last[f"imbalance_{when}"]):
                    self.rebalance_imbalance.labels(str(layer), when).set(ratio)
            self.rebalance_seconds.set(last["seconds"])
            self.rebalance_bytes.set(last["bytes_loaded"])

    def _record_dispatch(self, dispatch: HealthSnapshot) -> None:
        """Bring the failure counters and the recovery histogram up to the dispatch's running totals."""
        for actor, count in enumerate(dispatch.failures):
            seen = self._seen.failures[actor] if actor < len(self._seen.failures) else 0
            self.actor_failures.labels(str(actor)).inc(count - seen)
        self.dispatch_retries.inc(dispatch.retries - self._seen.retries)
        for seconds in dispatch.recovery_seconds[len(self._seen.recovery_seconds) :]:
            self.recovery_seconds.observe(seconds)
        self._seen = dispatch

    def _record_prefix_cache(self, queries: int, hits: int) -> None:
        seen_queries, seen_hits = self._prefix_seen
        self.prefix_queries.inc(queries - seen_queries)
        self.prefix_hits.inc(hits - seen_hits)
        self.prefix_hit_rate.set(hits / queries if queries else 0.0)
        self._prefix_seen = (queries, hits)

    def render(
        self, stats, expert_load: torch.Tensor, dispatch: HealthSnapshot | None = None, balance: dict | None = None
    ) -> bytes:
        """Refresh the engine gauges from ``stats``, the [L, E] load, the dispatch's health and the expert actors'
        balance, then render the text format."""
        if dispatch is not None:
            self._record_dispatch(dispatch)
        if balance is not None:
            self._record_balance(balance)
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_cache_usage.set(stats.kv_used_blocks / max(stats.kv_total_blocks, 1))
        self._record_prefix_cache(stats.prefix_query_tokens, stats.prefix_hit_tokens)
        load = expert_load.clone()  # [L, E]
        layers, experts = load.shape
        if layers * experts <= MAX_EXPERT_SERIES:
            for layer in range(layers):
                for expert in range(experts):
                    self.expert_tokens.labels(str(layer), str(expert)).set(int(load[layer, expert]))
        mean = load.float().mean(dim=1).clamp(min=1e-9)  # [L]
        for layer in range(layers):
            self.expert_imbalance.labels(str(layer)).set(float(load[layer].max()) / float(mean[layer]) if load[layer].sum() else 0.0)
        return generate_latest(self.registry)
