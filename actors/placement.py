"""Expert placement: which expert actor hosts which (layer, expert), and the replicas of each expert.

Plain data, no Ray: the launcher reads it to start actors, each actor reads its
own share of the checkpoint, and the coordinator builds its dispatch tables
from it. An expert may live on several actors (replicas); its tokens are then
spread over them in proportion to ``shares`` (equal when unset). A dense layer
(no experts: Qwen's ``mlp_only_layers``) has an empty entry. ``version`` numbers
the placements of one pool: a rebalance makes the next one, and every dispatch
names the version whose stacks it addresses.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class PlacementError(ValueError):
    """A placement that cannot serve the model; the message is one line."""


class ExpertPlacement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_actors: int
    hosts: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][expert] -> ids of the actors hosting it; () in a dense layer
    # [layer][expert][i] -> fraction of the expert's tokens sent to hosts[layer][expert][i]; None: equal split
    shares: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    version: int = 0

    @model_validator(mode="after")
    def _check(self) -> "ExpertPlacement":
        if self.num_actors < 1:
            raise PlacementError(f"need at least one expert actor, got {self.num_actors}")
        for layer, experts in enumerate(self.hosts):
            for expert, actors in enumerate(experts):
                if not actors:
                    raise PlacementError(f"layer {layer} expert {expert} is hosted by no actor")
                bad = [a for a in actors if not 0 <= a < self.num_actors]
                if bad:
                    raise PlacementError(
                        f"layer {layer} expert {expert} placed on actor {bad[0]}, but there are {self.num_actors} actors"
                    )
                if len(set(actors)) != len(actors):
                    raise PlacementError(f"layer {layer} expert {expert} lists an actor twice: {list(actors)}")
        if self.shares is not None:
            self._check_shares()
        return self

    def _check_shares(self) -> None:
        if [len(e) for e in self.shares] != [len(e) for e in self.hosts]:
            raise PlacementError("shares must have one entry per (layer, expert) of hosts")
        for layer, (experts, shares) in enumerate(zip(self.hosts, self.shares)):
            for expert, (actors, split) in enumerate(zip(experts, shares)):
                if len(split) != len(actors) or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
                    raise PlacementError(f"layer {layer} expert {expert}: shares {list(split)} do not split it over {list(actors)}")

    def shares_of(self, layer: int) -> tuple[tuple[float, ...], ...]:
        """[expert][i] -> fraction of the expert's tokens for its i-th host (equal when no shares are set)."""
        if self.shares is not None:
            return self.shares[layer]
        return tuple(tuple(1.0 / len(actors) for _ in actors) for actors in self.hosts[layer])

    def slots_of(self, actor: int) -> int:
        """The most experts ``actor`` hosts in any one layer."""
        return max((len(es) for es in self.hosted_by(actor).values()), default=0)

    @property
    def num_layers(self) -> int:
        return len(self.hosts)

    @property
    def num_experts(self) -> int:
        return max((len(experts) for experts in self.hosts), default=0)

    @classmethod
    def even(
        cls, num_layers: int, num_experts: int, num_actors: int, dense_layers: tuple[int, ...] = ()
    ) -> "ExpertPlacement":
        """Contiguous blocks of experts per actor; with more actors than experts, extra actors hold replicas."""
        if num_actors < 1:
            raise PlacementError(f"need at least one expert actor, got {num_actors}")
        if num_actors <= num_experts:
            per_expert = [(e * num_actors // num_experts,) for e in range(num_experts)]
        else:
            per_expert = [tuple(a for a in range(num_actors) if a % num_experts == e) for e in range(num_experts)]
        return cls(num_actors=num_actors, hosts=_per_layer(tuple(per_expert), num_layers, dense_layers))

    @classmethod
    def from_expert_map(
        cls,
        num_layers: int,
        num_experts: int,
        num_actors: int,
        expert_map: dict[int, list[int]],
        dense_layers: tuple[int, ...] = (),
    ) -> "ExpertPlacement":
        """The same map (expert -> actors) in every layer; every expert must appear."""
        missing = [e for e in range(num_experts) if e not in expert_map]
        if missing:
            raise PlacementError(f"expert map leaves experts {missing} without an actor")
        extra = [e for e in expert_map if not 0 <= e < num_experts]
        if extra:
            raise PlacementError(f"expert map names expert {extra[0]}, but the model has {num_experts} experts")
        per_expert = tuple(tuple(expert_map[e]) for e in range(num_experts))
        return cls(num_actors=num_actors, hosts=_per_layer(per_expert, num_layers, dense_layers))

    def hosted_by(self, actor: int) -> dict[int, list[int]]:
        """{layer: sorted expert ids} that ``actor`` hosts (layers where it hosts nothing are left out)."""
        hosted: dict[int, list[int]] = {}
        for layer, experts in enumerate(self.hosts):
            mine = [e for e, actors in enumerate(experts) if actor in actors]
            if mine:
                hosted[layer] = mine
        return hosted

    def shares_held_by(self, actor: int) -> dict[int, dict[int, float]]:
        """{layer: {expert: share}} of the replicated experts ``actor`` hosts, when shares are set: what the actor
        keeps, so that a restarted pool manager gets the split of each expert back (empty without shares)."""
        if self.shares is None:
            return {}
        held: dict[int, dict[int, float]] = {}
        for layer, (experts, shares) in enumerate(zip(self.hosts, self.shares)):
            for expert, (actors, split) in enumerate(zip(experts, shares)):
                if len(actors) > 1 and actor in actors:
                    held.setdefault(layer, {})[expert] = split[actors.index(actor)]
        return held


def _per_layer(per_expert: tuple[tuple[int, ...], ...], num_layers: int, dense_layers: tuple[int, ...]):
    """The same expert -> actors map in every MoE layer, nothing in the dense ones."""
    return tuple(() if layer in dense_layers else per_expert for layer in range(num_layers))
