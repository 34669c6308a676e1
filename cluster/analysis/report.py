"""The routing report: per domain (an input text) and MoE layer, expert shares and repetition rates.

    build_report(model, num_experts, k, {domain: RoutedTokens}) -> RoutingReport   (written as routing.json)

Consecutive pairs are counted inside each context window of a domain's tokens.
Dense layers have no router and are not in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from moeshard.cluster.analysis.capture import RoutedTokens
from moeshard.cluster.analysis.routing_stats import NO_PAIRS, consecutive_counts, expert_share, random_baseline

logger = logging.getLogger(__name__)

REPORT_FILE = "routing.json"


class Baseline(BaseModel):
    same_top1: float
    shared_any: float


class LayerRouting(BaseModel):
    layer: int  # the layer's index in the model
    expert_share: list[float]  # [E], sums to 1
    same_top1: float | None  # None when the domain has no consecutive pair
    shared_any: float | None


class DomainRouting(BaseModel):
    tokens: int
    windows: int  # context windows the tokens were split into (1 when they fit)
    layers: list[LayerRouting]


class RoutingReport(BaseModel):
    model: str
    experts: int
    top_k: int
    random_baseline: Baseline
    domains: dict[str, DomainRouting]

    def write(self, out_dir: Path) -> Path:
        path = out_dir / REPORT_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def domain_routing(routed: RoutedTokens, num_experts: int) -> DomainRouting:
    layers = []
    for i, layer in enumerate(routed.layers):
        counts = sum((consecutive_counts(ids) for ids in routed.windows(i)), NO_PAIRS)  # [W, K] per window
        share = expert_share(routed.expert_ids[i], num_experts)  # [E]
        rates = dict(same_top1=counts.same_top1_rate, shared_any=counts.shared_any_rate)
        layers.append(LayerRouting(layer=layer, expert_share=share.tolist(), **rates))
    return DomainRouting(tokens=routed.num_tokens, windows=len(routed.window_starts), layers=layers)


def build_report(model: str, num_experts: int, k: int, domains: Mapping[str, RoutedTokens]) -> RoutingReport:
    baseline = random_baseline(num_experts, k)
    return RoutingReport(
        model=model,
        experts=num_experts,
        top_k=k,
        random_baseline=Baseline(same_top1=baseline.same_top1, shared_any=baseline.shared_any),
        domains={name: domain_routing(routed, num_experts) for name, routed in domains.items()},
    )
