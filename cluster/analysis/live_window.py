"""Repetition rates of live traffic: same_top1 and shared_any over the last W routed token pairs, per MoE layer.

A routing observer on the serving model, called once per step with every MoE layer's expert ids. Each
step's batch lays sequences' chunks end to end; inside a chunk a row's previous token is the row before it;
a chunk's first row pairs with the last token this sequence routed in an earlier step (remembered per
sequence, for every layer). A chunk starting at position 0
(a new sequence, or one recomputed after preemption) has no previous token. A sequence is forgotten when
it is no longer running (``live_sequences``) and, in any case, past the ``max_sequences`` most recently seen.

Every layer sees the same pairs (the same tokens), so one ring buffer keeps the last W pairs' two flags
for all layers. The observer runs on the engine's loop thread and ``snapshot`` on the server's, so both
take a lock.

Dimensions: L MoE layers, T tokens of a step, P pairs, K chosen per token, W the window.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
from pydantic import BaseModel

from moeshard.cluster.analysis.routing_stats import pair_flags, random_baseline
from moeshard.cluster.engine.engine import Engine
from moeshard.cluster.model.batch import StepBatch

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 4096
DEFAULT_MAX_SEQUENCES = 1024


class LastToken(NamedTuple):
    position: int
    expert_ids: torch.Tensor  # [L, K]


class PreviousTokens(NamedTuple):
    expert_ids: torch.Tensor  # [L, T, K]: each row's previous token's expert ids
    valid: torch.Tensor  # [T] bool: whether the row has a previous token


class PairRing:
    """The last ``size`` pairs' (same_top1, shared_any) flags, for each of ``layers`` layers."""

    def __init__(self, size: int, layers: int):
        self.flags = torch.zeros(size, layers, 2, dtype=torch.bool)  # [W, L, 2]
        self.next = 0
        self.filled = 0

    def add(self, same_top1: torch.Tensor, shared_any: torch.Tensor) -> None:
        """same_top1, shared_any [L, P] bool, oldest pair first."""
        size = self.flags.shape[0]
        flags = torch.stack([same_top1, shared_any], dim=2).transpose(0, 1)[-size:]  # [min(P, W), L, 2]
        slots = (self.next + torch.arange(flags.shape[0])) % size
        self.flags[slots] = flags
        self.next = (self.next + flags.shape[0]) % size
        self.filled = min(size, self.filled + flags.shape[0])

    def rates(self) -> list[tuple[float | None, float | None]]:
        """Per layer: (same_top1, shared_any) over the window; None while it is empty."""
        if self.filled == 0:
            return [(None, None)] * self.flags.shape[1]
        return [tuple(rates) for rates in self.flags[: self.filled].double().mean(dim=0).tolist()]  # [L, 2]


class LiveBaseline(BaseModel):
    same_top1: float
    shared_any: float


class LiveLayerRates(BaseModel):
    layer: int
    same_top1: float | None  # None until the layer has seen a pair
    shared_any: float | None


class LiveRouting(BaseModel):
    """What ``/v1/experts`` reports under ``routing``."""

    window_tokens: int  # consecutive token pairs in the window now (the same in every MoE layer)
    random_baseline: LiveBaseline
    layers: list[LiveLayerRates]


class LiveRoutingWindow:
    """A routing observer (``MoeModel.routing_observer``) keeping repetition rates over the last ``window`` pairs."""

    def __init__(
        self,
        layers: tuple[int, ...],
        num_experts: int,
        k: int,
        window: int = DEFAULT_WINDOW,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
        live_sequences: Callable[[], Collection[int]] | None = None,
    ):
        if window <= 0 or max_sequences <= 0:
            raise ValueError(f"window and max_sequences must be positive, got {window} and {max_sequences}")
        self.layers = layers
        self.baseline = random_baseline(num_experts, k)
        self.max_sequences = max_sequences
        self.live_sequences = live_sequences
        self.ring = PairRing(window, len(layers))
        self.last: OrderedDict[int, LastToken] = OrderedDict()  # seq id -> its last routed token
        self.lock = threading.Lock()

    def __call__(self, batch: StepBatch, expert_ids: torch.Tensor) -> None:
        ids = expert_ids.cpu().long()  # [L, T, K]
        with self.lock:
            self._forget()
            previous, valid = self._previous(batch, ids)  # [L, T, K], [T]
            flags = pair_flags(previous[:, valid], ids[:, valid])  # [L, P] each
            self.ring.add(flags.same_top1, flags.shared_any)

    def _previous(self, batch: StepBatch, ids: torch.Tensor) -> PreviousTokens:
        """Each row's previous token's expert ids and whether it has one; remembers each chunk's last row."""
        previous = torch.roll(ids, 1, dims=1)  # [L, T, K]: row t-1's ids at row t
        valid = torch.ones(ids.shape[1], dtype=torch.bool)
        row = 0
        for chunk in batch.chunks:
            before = self.last.pop(chunk.seq_id, None)
            if chunk.start_pos > 0 and before is not None and before.position == chunk.start_pos - 1:
                previous[:, row] = before.expert_ids
            else:
                valid[row] = False
            row += chunk.num_tokens
            self.last[chunk.seq_id] = LastToken(chunk.end_pos - 1, ids[:, row - 1].clone())  # most recently seen last
        return PreviousTokens(previous, valid)

    def _forget(self) -> None:
        """Drop sequences that are no longer running, then the least recently seen past the bound."""
        if self.live_sequences is not None:
            live = set(self.live_sequences())
            for seq_id in [s for s in self.last if s not in live]:
                del self.last[seq_id]
        while len(self.last) > self.max_sequences:
            self.last.popitem(last=False)

    def snapshot(self) -> LiveRouting:
        with self.lock:
            rates = dict(zip(self.layers, self.ring.rates()))
            pairs = self.ring.filled if self.layers else 0
        return LiveRouting(
            window_tokens=pairs,
            random_baseline=LiveBaseline(same_top1=self.baseline.same_top1, shared_any=self.baseline.shared_any),
            layers=[LiveLayerRates(layer=layer, same_top1=same, shared_any=shared) for layer, (same, shared) in rates.items()],
        )


def attach_live_window(engine: Engine, window: int = DEFAULT_WINDOW) -> LiveRoutingWindow:
    """Observe ``engine``'s routing over the last ``window`` token pairs; sequences are forgotten once not running."""
    config = engine.model.config
    observer = LiveRoutingWindow(
        config.moe_layers, config.num_experts, config.experts_per_token, window,
        max_sequences=max(DEFAULT_MAX_SEQUENCES, 2 * engine.max_running),
        live_sequences=lambda: [seq.seq_id for seq in engine.running],  # read on the engine's own thread, mid-step
    )  # fmt: skip
    engine.model.routing_observer = observer
    return observer
