"""Capturing a text's routing: run its token ids as a prefill and record every MoE layer's expert ids.

    route_tokens(engine, token_ids)    -> RoutedTokens (expert ids [L_moe, T, K], in token order)

The tokens go through the engine's own scheduler as one request that generates a
single token, so a prefill longer than the batch budget is chunked as in serving;
the recorder files each routed row under its position, so the order is kept
whatever the chunking. A text longer than the model's context is cut into windows
of ``max_model_len - 1`` tokens (room for the one generated token), each its own
prefill: the window's first token attends to nothing before it. The routing is
computed on the coordinator, so it is the same with the experts in process or on
expert actors.

Dimensions: T tokens, W a window's tokens, L_moe MoE layers, K chosen per token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moeshard.cluster.engine.engine import Engine
from moeshard.cluster.engine.sampling import SamplingParams
from moeshard.cluster.model.batch import StepBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedTokens:
    """The routing of one text's tokens at every MoE layer."""

    layers: tuple[int, ...]  # the MoE layers' indices (dense layers have no router)
    expert_ids: torch.Tensor  # [L_moe, T, K] int64, first choice first
    window_starts: tuple[int, ...]  # where each context window starts; consecutive pairs stay inside one

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    def windows(self, layer_index: int) -> list[torch.Tensor]:
        """The expert ids [W, K] of each window at the ``layer_index``-th MoE layer."""
        ends = (*self.window_starts[1:], self.num_tokens)
        return [self.expert_ids[layer_index, start:end] for start, end in zip(self.window_starts, ends)]


class WindowRecorder:
    """A routing observer that files one sequence's routed rows by position: [L_moe, W, K]."""

    def __init__(self, layers: tuple[int, ...], num_tokens: int, k: int):
        self.expert_ids = torch.full((len(layers), num_tokens, k), -1, dtype=torch.int64)  # [L_moe, W, K]
        self.seq_ids: set[int] = set()

    def __call__(self, batch: StepBatch, expert_ids: torch.Tensor) -> None:
        ids = expert_ids.cpu().long()  # [L_moe, T, K]
        row = 0
        for chunk in batch.chunks:
            self.seq_ids.add(chunk.seq_id)
            self.expert_ids[:, chunk.start_pos : chunk.end_pos] = ids[:, row : row + chunk.num_tokens]
            row += chunk.num_tokens

    def result(self) -> torch.Tensor:
        if len(self.seq_ids) != 1 or bool((self.expert_ids < 0).any()):
            raise RuntimeError(f"routing capture saw sequences {sorted(self.seq_ids)} and missed some tokens")
        return self.expert_ids


def route_tokens(engine: Engine, token_ids: list[int]) -> RoutedTokens:
    """Prefill ``token_ids`` (window by window) on an idle engine; every MoE layer's expert ids, in token order."""
    if engine.has_work():
        raise RuntimeError("routing capture needs an idle engine")
    config = engine.model.config
    window = engine.max_model_len - 1
    starts = tuple(range(0, len(token_ids), window))
    if len(starts) > 1:
        logger.info("%d tokens are more than the context holds: %d windows of up to %d", len(token_ids), len(starts), window)
    parts = [_route_window(engine, token_ids[start : start + window], i) for i, start in enumerate(starts)]
    expert_ids = torch.cat(parts, dim=1) if parts else torch.zeros(len(config.moe_layers), 0, config.experts_per_token)
    return RoutedTokens(config.moe_layers, expert_ids, starts)


def _route_window(engine: Engine, token_ids: list[int], index: int) -> torch.Tensor:
    """One window's prefill (the engine chunks it by its batch budget) -> expert ids [L_moe, W, K]."""
    model = engine.model
    recorder = WindowRecorder(model.config.moe_layers, len(token_ids), model.config.experts_per_token)
    previous, model.routing_observer = model.routing_observer, recorder
    try:
        with engine.cache.prefix_caching_off():  # every row is computed (and so seen), none taken from the cache
            engine.add_request(f"routing-{index}", token_ids, SamplingParams(max_tokens=1, temperature=0.0))
            while engine.has_work():
                engine.step()
    finally:
        model.routing_observer = previous
    return recorder.result()
