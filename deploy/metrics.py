"""Prometheus metrics of the server, in their own registry.

Label cardinality is bounded: requests by final status, and expert load by
(layer, expert) only while layers x experts stays under ``MAX_EXPERT_SERIES``;
beyond it, load is reported per layer as the max/mean ratio.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

MAX_EXPERT_SERIES = 2048
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends: the coordinator's own footprint
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
        self.expert_tokens = Gauge(
            "moeshard_expert_tokens", "Tokens routed to each expert since start", ["layer", "expert"], registry=r
        )
        self.expert_imbalance = Gauge(
            "moeshard_expert_load_imbalance", "Per-layer max/mean of tokens per expert", ["layer"], registry=r
        )

    def render(self, stats, expert_load: torch.Tensor) -> bytes:
        """Refresh the engine gauges from ``stats`` and the [L, E] load, then render the text format."""
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_cache_usage.set(stats.kv_used_blocks / max(stats.kv_total_blocks, 1))
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
