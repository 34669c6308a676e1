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
    def __init__(self, num_layers: int, num_experts: int, num_actors: int, clock):
        self._clock = clock
        self._lock = threading.Lock()
        self._shape = (num_layers, num_experts, num_actors)
        self._reset()
        self._reset_delta()

    def _reset_delta(self) -> None:
        layers, experts, actors = self._shape
        self._delta = LoadDelta(torch.zeros(layers, experts, dtype=torch.int64), torch.zeros(layers, actors, dtype=torch.int64), 0)

    def _reset(self) -> None:
        layers, experts, actors = self._shape
        self._choices = torch.zeros(layers, experts, dtype=torch.int64)  # [L, E]
        self._rows = torch.zeros(layers, actors, dtype=torch.int64)  # [L, A]
        self._steps = 0
        self._opened = self._clock()

    def resize(self, num_actors: int) -> None:
        """The pool was scaled: a new window over ``num_actors`` actors."""
        with self._lock:
            self._shape = (*self._shape[:2], num_actors)
            self._reset()
            self._reset_delta()

    def record(self, layer: int, expert_ids: torch.Tensor, send_to: torch.Tensor, first_layer: bool) -> None:
        """One layer's dispatch: expert_ids [T, K], send_to [T, K] (actor per choice, -1 for a repeat)."""
        layers, experts, actors = self._shape
        choices = torch.bincount(expert_ids.reshape(-1), minlength=experts)  # [E]
        rows = torch.bincount(send_to[send_to >= 0], minlength=actors)  # [A]
        with self._lock:
            self._choices[layer] += choices[:experts]
            self._rows[layer] += rows[:actors]
            self._steps += int(first_layer)
            self._delta.expert_choices[layer] += choices[:experts]
            self._delta.actor_rows[layer] += rows[:actors]
            if first_layer:
                self._delta = LoadDelta(self._delta.expert_choices, self._delta.actor_rows, self._delta.steps + 1)

    def take(self) -> LoadDelta | None:
        """The counts since the last ``take`` (None if no step ran), for a shared pool's manager."""
        with self._lock:
            delta = self._delta
            if delta.steps == 0 and not delta.expert_choices.any():
                return None
            self._reset_delta()
        return delta

    def add(self, delta: LoadDelta) -> bool:
        """Count another coordinator's ``delta`` in this window (False, and nothing counted, if its shape differs:
        it was measured before the pool was scaled)."""
        with self._lock:
            if delta.expert_choices.shape != self._choices.shape or delta.actor_rows.shape != self._rows.shape:
                return False
            self._choices += delta.expert_choices
            self._rows += delta.actor_rows
            self._steps += delta.steps
        return True

    def window(self, reset: bool = False) -> LoadWindow:
        """A copy of the counts so far; ``reset`` starts a new window."""
        with self._lock:
            window = LoadWindow(self._choices.clone(), self._rows.clone(), self._steps, self._clock() - self._opened)
            if reset:
                self._reset()
        return window
