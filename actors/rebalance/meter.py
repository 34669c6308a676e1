"""What the coordinator's dispatch measures for balancing: choices per expert and rows per actor, per layer.

Counted since the last rebalance (a window): the load the next placement is planned from, and the rows
each actor was sent, whose max / mean per layer is the imbalance the step waits on. Written by the
dispatch thread, read by metrics and the rebalance: both sides take a lock, copies leave it.

Dimensions: L layers, E experts, A actors, T tokens, K chosen per token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoadWindow:
    expert_choices: torch.Tensor  # [L, E] int64 (token, expert) choices per expert
    actor_rows: torch.Tensor  # [L, A] int64 rows sent per actor (a token once per actor)
    steps: int  # forward passes (dispatches of the first MoE layer)
    seconds: float  # how long the window has been open

    def rows_per_step(self) -> list[float]:
        """[A] rows each actor was sent per step, over all layers."""
        return (self.actor_rows.sum(dim=0).double() / max(self.steps, 1)).tolist()

    def imbalance(self) -> list[float]:
        """[L] max / mean of the actors' rows (0 where nothing was sent: a dense layer, or no step yet)."""
        rows = self.actor_rows.double()  # [L, A]
        mean = rows.mean(dim=1)  # [L]
        return torch.where(mean > 0, rows.max(dim=1).values / mean.clamp(min=1e-12), 0.0).tolist()


@dataclass(frozen=True)
class LoadDelta:
    """What one coordinator's dispatch counted since it last reported (to a shared pool's manager)."""

    expert_choices: torch.Tensor  # [L, E] int64
    actor_rows: torch.Tensor  # [L, A] int64
    steps: int


class LoadMeter:
    """Layers' dispatches are queued as recorded and counted in one pass every ``FOLD_EVERY`` layers (or when
    read): a decode step of a few tokens would otherwise pay a dozen small tensor operations per layer."""

    FOLD_EVERY = 64  # recorded layers queued before they are counted

    def __init__(self, num_layers: int, num_experts: int, num_actors: int, clock):
        self._clock = clock
        self._lock = threading.Lock()
        self._shape = (num_layers, num_experts, num_actors)
        self._queued: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []  # (layer, expert_ids, send_to, first)
        self._reset()
        self._reset_delta()

    # The counts are normal tensors even when (re)made inside the engine's inference mode: the queue is also
    # folded by readers outside it, and an inference tensor may not be updated in place there.
    def _reset_delta(self) -> None:
        layers, experts, actors = self._shape
        with torch.inference_mode(False):
            self._delta = LoadDelta(torch.zeros(layers, experts, dtype=torch.int64), torch.zeros(layers, actors, dtype=torch.int64), 0)

    def _reset(self) -> None:
        layers, experts, actors = self._shape
        with torch.inference_mode(False):
            self._choices = torch.zeros(layers, experts, dtype=torch.int64)  # [L, E]
            self._rows = torch.zeros(layers, actors, dtype=torch.int64)  # [L, A]
        self._steps = 0
        self._opened = self._clock()

    def resize(self, num_actors: int) -> None:
        """The pool was scaled: a new window over ``num_actors`` actors."""
        with self._lock:
            self._shape = (*self._shape[:2], num_actors)
            self._queued = []  # counted over the old actors: not part of the new window
            self._reset()
            self._reset_delta()

    def record(self, layer: int, expert_ids: torch.Tensor, send_to: torch.Tensor, first_layer: bool) -> None:
        """One layer's dispatch: expert_ids [T, K], send_to [T, K] (actor per choice, -1 for a repeat).
        Neither tensor may change afterwards: they are counted later."""
        with self._lock:
            self._queued.append((layer, expert_ids, send_to, first_layer))
            if len(self._queued) >= self.FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Count the queued dispatches (under the lock): one bincount over (layer, expert) and one over (layer, actor)."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        layers, experts, actors = self._shape
        layer_ids = torch.tensor([layer for layer, _, _, _ in queued])  # [Q]
        ids = [expert_ids.reshape(-1) for _, expert_ids, _, _ in queued]  # Q x [T*K]
        sent = [send_to.reshape(-1) for _, _, send_to, _ in queued]  # Q x [T*K]
        sizes = torch.tensor([x.numel() for x in ids])  # [Q]
        flat_ids, flat_sent = torch.cat(ids).cpu(), torch.cat(sent).cpu()  # [M] (from the coordinator's GPU, with the
        # collective transport: one copy per fold; the counts live on the host, where metrics and the rebalance read them)
        layer_of = torch.repeat_interleave(layer_ids, sizes)  # [M]
        choices = torch.bincount(layer_of * experts + flat_ids, minlength=layers * experts).view(layers, experts)
        keep = (flat_sent >= 0) & (flat_sent < actors)  # [M] sent, to an actor of this window
        rows = torch.bincount((layer_of * actors + flat_sent)[keep], minlength=layers * actors).view(layers, actors)
        steps = sum(first for _, _, _, first in queued)
        self._choices += choices
        self._rows += rows
        self._steps += steps
        self._delta.expert_choices.add_(choices)
        self._delta.actor_rows.add_(rows)
        if steps:
            self._delta = LoadDelta(self._delta.expert_choices, self._delta.actor_rows, self._delta.steps + steps)

    def take(self) -> LoadDelta | None:
        """The counts since the last ``take`` (None if no step ran), for a shared pool's manager."""
        with self._lock:
            self._fold()
            delta = self._delta
            if delta.steps == 0 and not delta.expert_choices.any():
                return None
            self._reset_delta()
        return delta

    def add(self, delta: LoadDelta) -> bool:
        """Count another coordinator's ``delta`` in this window (False, and nothing counted, if its shape differs:
        it was measured before the pool was scaled)."""
        with self._lock:
            self._fold()
            if delta.expert_choices.shape != self._choices.shape or delta.actor_rows.shape != self._rows.shape:
                return False
            self._choices += delta.expert_choices
            self._rows += delta.actor_rows
            self._steps += delta.steps
        return True

    def window(self, reset: bool = False) -> LoadWindow:
        """A copy of the counts so far; ``reset`` starts a new window."""
        with self._lock:
            self._fold()
            window = LoadWindow(self._choices.clone(), self._rows.clone(), self._steps, self._clock() - self._opened)
            if reset:
                self._reset()
        return window
