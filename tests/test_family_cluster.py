"""Qwen2-MoE, Qwen3-MoE and OLMoE with their experts on actors across a multi-node Ray cluster.

The sharded output equals transformers' own class on the same checkpoint
(float32 logits within 1e-4, greedy tokens equal) and the single-process path;
dense layers and the shared expert stay on the coordinator, routed experts
only on the actors, every actor holding exactly the keys of its placement.
"""

from __future__ import annotations

import pytest
import ray
import torch
import transformers

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model.checkpoint import ExpertKey, expert_weight_shapes
from moeshard.cluster.model.config import ModelConfig

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3, 8], [1, 7, 7, 7, 64, 12, 90, 4, 55, 21, 3]]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
NODES = ("node_a", "node_b")  # the worker nodes of the ray_cluster fixture (conftest.py)

CASES = {
    "qwen2_shared_dense_e64_k8_3_actors": (
        "Qwen2MoeForCausalLM",
        dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=64, num_experts_per_tok=8),
        dict(expert_actors=3),
    ),
    "qwen3_e128_k8_4_actors_compiled_graph": (
        "Qwen3MoeForCausalLM",
        dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
        dict(expert_actors=4, transport="compiled_graph"),
    ),
    "olmoe_e16_k4_2_actors_replicated": (
        "OlmoeForCausalLM",
        dict(),
        dict(expert_actors=2, expert_map={e: [e % 2, (e + 1) % 2] if e % 4 == 0 else [e % 2] for e in range(16)}),
    ),
}


def _greedy_transformers(reference, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False, pad_token_id=0)
    generated = out[0, len(prompt) :].tolist()
    eos = reference.config.eos_token_id
    return generated[: generated.index(eos) + 1] if eos in generated else generated


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_family_equals_transformers(case, ray_cluster, tiny_family_factory):
    architecture, overrides, layout = CASES[case]
    path = tiny_family_factory(case, architecture, seed=len(case), **overrides)
    reference = getattr(transformers, architecture).from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    with LLM(path) as single:
        single_logits = [single.logits(p) for p in PROMPTS]
        single_tokens = [o.token_ids for o in single.generate(PROMPTS, GREEDY)]

    options = dict(layout)
    n = options.pop("expert_actors")
    cluster = dict(options, actor_resources=[{NODES[a % 2]: 1} for a in range(n)], coordinator_resources={"head": 1})
    with LLM(path, expert_actors=n, cluster=cluster) as llm:
        for prompt, expected in zip(PROMPTS, single_logits):
            ours = llm.logits(prompt)
            with torch.no_grad():
                theirs = reference(torch.tensor([prompt])).logits[0].float()
            assert (ours - theirs).abs().max().item() < 1e-4
            assert (ours - expected).abs().max().item() < 1e-5
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert tokens == single_tokens == [_greedy_transformers(reference, p) for p in PROMPTS]

        config = ModelConfig.from_model_dir(path)
        placement = llm._cluster.placement
        for actor, handle in enumerate(llm._cluster.expert_actors):
            hosted = placement.hosted_by(actor)
            assert set(hosted) <= set(config.moe_layers)  # dense layers live on the coordinator
            expected_keys = sorted(
                key for layer, experts in hosted.items() for e in experts for key in expert_weight_shapes(config, ExpertKey(layer, e))
            )
            assert ray.get(handle.hosted_keys.remote()) == expected_keys
        report = llm.placement()
        assert len(report) == len(config.moe_layers) * config.num_experts
        assert all(row["nodes"] == [ray_cluster[NODES[a % 2]] for a in row["actors"]] for row in report)

        names = ray.get(llm._cluster.coordinator.tensor_names.remote())
        routed = [name for name in names if "expert" in name and "shared_expert" not in name]
        assert names and not routed
        assert any("shared_expert" in name for name in names) == bool(config.shared_expert_intermediate_size)
        assert any(name.endswith(".mlp") for name in names) == bool(config.dense_layers)
