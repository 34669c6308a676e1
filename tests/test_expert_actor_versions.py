"""An expert actor's placement versions, in process (no Ray): stage beside, compute with either, retire, adopt."""

from __future__ import annotations

import torch

from moeshard.actors.expert_actor import ExpertActor
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.moe import LocalExperts
from moeshard.kernels import RouterOutput


def _batch(version: int, hosted: list[int], expert_ids: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor) -> bytes:
    """Rows whose choices of ``hosted`` experts are served here; local ids index the sorted hosted list."""
    local = torch.full_like(expert_ids, -1)
    for i, e in enumerate(sorted(hosted)):
        local[expert_ids == e] = i
    w = torch.where(local >= 0, weights, 0.0)
    return ExpertBatch(0, 7, hidden, local.int(), w.float(), version).encode()


def _reference(model_dir, hidden, expert_ids, weights, hosted: list[int]) -> torch.Tensor:
    """LocalExperts over every expert, with the choices of experts not in ``hosted`` weighted 0."""
    config = ModelConfig.from_model_dir(model_dir)
    local = LocalExperts.from_checkpoint(CheckpointReader(model_dir, config), torch.float32)
    w = torch.where(torch.isin(expert_ids, torch.tensor(hosted)), weights, 0.0)
    return local(0, hidden, RouterOutput(weights=w, expert_ids=expert_ids))


def test_staged_version_computes_its_experts_beside_the_current_one(tiny_mixtral_dir):
    torch.manual_seed(0)
    actor = ExpertActor(0, str(tiny_mixtral_dir), "float32", {0: [0, 1], 1: [0, 1]})
    hidden = torch.randn(6, 64)  # [T, D]
    expert_ids = torch.randint(0, 8, (6, 2))  # [T, K]
    weights = torch.softmax(torch.randn(6, 2), dim=-1)

    report = actor.stage(1, {0: [1, 5, 6], 1: [0, 1]})  # layer 1 unchanged: shared, nothing read
    expert_bytes = 3 * 50 * 64 * 4  # w1, w3, w2 of one expert in float32
    assert report["bytes_loaded"] == 2 * expert_bytes  # experts 5 and 6; 1 is copied from the current stack
    assert actor.versions[1][1] is actor.versions[0][1]

    old = ExpertReply.decode(actor.run_experts(_batch(0, [0, 1], expert_ids, hidden, weights)))
    new = ExpertReply.decode(actor.run_experts(_batch(1, [1, 5, 6], expert_ids, hidden, weights)))
    torch.testing.assert_close(old.rows, _reference(tiny_mixtral_dir, hidden, expert_ids, weights, [0, 1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(new.rows, _reference(tiny_mixtral_dir, hidden, expert_ids, weights, [1, 5, 6]), rtol=0, atol=1e-5)

    assert actor.retire(1) == 2 * (3 + 2) * expert_bytes // 2  # layer 0: 3 experts, layer 1: 2
    assert sorted(actor.versions) == [1]
    stale = ExpertReply.decode(actor.run_experts(_batch(0, [0, 1], expert_ids, hidden, weights)))
    assert stale.stale and stale.tag == 7 and stale.rows.shape == (0, 64)


def test_adopt_loads_a_version_the_actor_does_not_hold(tiny_mixtral_dir):
    actor = ExpertActor(1, str(tiny_mixtral_dir), "float32", {0: [4, 5, 6, 7], 1: [4, 5, 6, 7]})  # as after a restart
    assert actor.adopt(3, {0: [0, 4], 1: [7]})
    assert sorted(actor.versions) == [3]
    assert {layer: list(stack.expert_ids) for layer, stack in actor.stacks.items()} == {0: [0, 4], 1: [7]}  # no Ray here
    assert actor.adopt(3, {0: [0, 4], 1: [7]})  # held already: nothing to do
