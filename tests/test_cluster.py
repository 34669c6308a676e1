"""The expert-sharded cluster on a real multi-node Ray cluster equals the single-process path."""

from __future__ import annotations

import pytest
import ray

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model.checkpoint import ExpertKey, expert_weight_shapes
from moeshard.cluster.model.config import ModelConfig

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3, 8], [1, 7, 7, 7, 64, 12, 90, 4, 55, 21, 3]]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
NODES = ("node_a", "node_b")  # the worker nodes of the ray_cluster fixture (conftest.py)


@pytest.fixture(scope="module")
def reference(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        yield {
            "logits": [llm.logits(p) for p in PROMPTS],
            "tokens": [o.token_ids for o in llm.generate(PROMPTS, GREEDY)],
        }


def _pinned(num_actors: int) -> list[dict[str, float]]:
    """Alternate actors between the two worker nodes."""
    return [{NODES[a % 2]: 1} for a in range(num_actors)]


LAYOUTS = {
    "1_actor": dict(expert_actors=1),
    "2_actors": dict(expert_actors=2),
    "3_actors_uneven": dict(expert_actors=3),
    "4_actors": dict(expert_actors=4),
    "4_actors_actor_calls": dict(expert_actors=4, transport="actor_calls"),
    "4_actors_compiled_graph": dict(expert_actors=4, transport="compiled_graph"),
    "3_actors_collective": dict(expert_actors=3, transport="collective"),
    "3_actors_replicated": dict(
        expert_actors=3, expert_map={e: [e % 3, (e + 1) % 3] for e in range(8)}
    ),
}


@pytest.mark.parametrize("layout", ["2_actors", "3_actors_replicated", "3_actors_collective"])
def test_bfloat16_cluster_equals_single_process(layout, ray_cluster, tiny_mixtral_dir):
    """In bfloat16 each actor returns its partial sums in float32 and the coordinator rounds a token's sum once,
    as the single process does. With partials rounded to bfloat16 on the actors, the logits here were 0.016 apart."""
    with LLM(tiny_mixtral_dir, dtype="bfloat16") as llm:
        expected_logits = [llm.logits(p) for p in PROMPTS]
        expected_tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    options = dict(LAYOUTS[layout])
    n = options.pop("expert_actors")
    cluster = dict(options, actor_resources=_pinned(n), coordinator_resources={"head": 1})
    with LLM(tiny_mixtral_dir, expert_actors=n, dtype="bfloat16", cluster=cluster) as llm:
        for prompt, expected in zip(PROMPTS, expected_logits):
            assert (llm.logits(prompt) - expected).abs().max().item() < 1e-5
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected_tokens


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_cluster_equals_single_process(layout, ray_cluster, tiny_mixtral_dir, reference):
    options = dict(LAYOUTS[layout])
    n = options.pop("expert_actors")
    cluster = dict(options, actor_resources=_pinned(n), coordinator_resources={"head": 1})
    with LLM(tiny_mixtral_dir, expert_actors=n, cluster=cluster) as llm:
        for prompt, expected in zip(PROMPTS, reference["logits"]):
            assert (llm.logits(prompt) - expected).abs().max().item() < 1e-5
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference["tokens"]

        # Each actor holds exactly the experts the placement gives it, on the node it was pinned to.
        config = ModelConfig.from_model_dir(tiny_mixtral_dir)
        placement = llm._cluster.placement
        for actor, handle in enumerate(llm._cluster.expert_actors):
            expected_keys = sorted(
                key
                for layer, experts in placement.hosted_by(actor).items()
                for e in experts
                for key in expert_weight_shapes(config, ExpertKey(layer, e))
            )
            assert ray.get(handle.hosted_keys.remote()) == expected_keys
        report = llm.placement()
        assert len(report) == config.num_layers * config.num_experts
        for row in report:
            assert row["nodes"] == [ray_cluster[NODES[a % 2]] for a in row["actors"]]
        if "expert_map" in cluster:
            assert all(row["actors"] == cluster["expert_map"][row["expert"]] for row in report)

        # The coordinator holds no expert tensor.
        names = ray.get(llm._cluster.coordinator.tensor_names.remote())
        assert names and not any("expert" in name for name in names)


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_coordinator_runs_on_the_cpus_it_asks_for(cpus, ray_cluster, tiny_mixtral_dir, reference):
    """``coordinator_cpus``: the coordinator's bundle holds that many CPUs and its torch work runs on that many
    threads; the outputs stay the single process's."""
    cluster = dict(actor_resources=_pinned(2), coordinator_resources={"head": 1}, coordinator_cpus=cpus)
    with LLM(tiny_mixtral_dir, expert_actors=2, cluster=cluster) as llm:
        assert ray.get(llm._cluster.coordinator.info.remote())["torch_threads"] == cpus
        bundles = ray.util.placement_group_table(llm._cluster.pool.group)["bundles"]
        assert bundles[len(bundles) - 1]["CPU"] == cpus  # the coordinator's bundle is the group's last
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference["tokens"]
