"""Expert placement: which expert actor hosts which (layer, expert), and the replicas of each expert.

Plain data, no Ray: the launcher reads it to start actors, each actor reads its
own share of the checkpoint, and the coordinator builds its dispatch tables
from it. An expert may live on several actors (replicas); its tokens are then
spread over them. A dense layer (no experts: Qwen's ``mlp_only_layers``) has
an empty entry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class PlacementError(ValueError):
    """A placement that cannot serve the model; the message is one line."""


class ExpertPlacement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_actors: int
    hosts: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][expert] -> ids of the actors hosting it; () in a dense layer

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
        return self

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


def _per_layer(per_expert: tuple[tuple[int, ...], ...], num_layers: int, dense_layers: tuple[int, ...]):
    """The same expert -> actors map in every MoE layer, nothing in the dense ones."""
    return tuple(() if layer in dense_layers else per_expert for layer in range(num_layers))
