"""Destinations for permute when tokens go to expert actors rather than to experts.

A token is sent to an actor once, however many of its K experts live there:

    actor_ids = expert_to_actor[expert_ids]        # [T, K]
    dest_ids  = dedupe_destinations(actor_ids)     # [T, K], repeats within a row -> -1
    perm      = permute(hidden, dest_ids, num_actors)

Dimensions: T tokens, K chosen per token.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def dedupe_destinations(dest_ids: torch.Tensor) -> torch.Tensor:
    """dest_ids [T, K] -> the same with every id already seen earlier in its row replaced by -1."""
    assert dest_ids.dim() == 2 and not dest_ids.is_floating_point(), dest_ids.shape
    ordered, order = torch.sort(dest_ids, dim=1, stable=True)  # [T, K]; equal ids keep row order
    repeat = torch.zeros_like(ordered, dtype=torch.bool)  # [T, K] in sorted order
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    seen = torch.empty_like(repeat).scatter_(1, order, repeat)  # [T, K] back in row order
    return torch.where(seen, torch.full_like(dest_ids, -1), dest_ids)
