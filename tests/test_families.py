"""The architecture registry: config.json of each family, read as transformers reads it; unsupported ones refused."""

from __future__ import annotations

import pytest
import transformers

from moeshard.cluster.model.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig

SPARSITY = [
    dict(),
    dict(decoder_sparse_step=2, num_hidden_layers=5),
    dict(mlp_only_layers=[0, 3], num_hidden_layers=4),
    dict(mlp_only_layers=[1], decoder_sparse_step=3, num_hidden_layers=6),
]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=8, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2)  # fmt: skip


def _ours_and_theirs(architecture: str, **overrides):
    model_cls = getattr(transformers, architecture)
    hf_config = model_cls.config_class(**{**SMALL, **overrides})
    raw = {**hf_config.to_dict(), "architectures": [architecture]}
    return ModelConfig.from_hf_dict(raw), model_cls(hf_config)


def test_supported_architectures():
    assert set(SUPPORTED_ARCHITECTURES) == {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"}


@pytest.mark.parametrize("architecture", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
@pytest.mark.parametrize("sparsity", range(len(SPARSITY)))
def test_dense_layers_are_where_transformers_puts_a_dense_mlp(architecture, sparsity):
    ours, model = _ours_and_theirs(architecture, **SPARSITY[sparsity])
    theirs = tuple(i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts"))
    assert ours.dense_layers == theirs
    assert ours.moe_layers == tuple(i for i in range(ours.num_layers) if i not in theirs)


@pytest.mark.parametrize("architecture", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_family_fields_match_transformers_modules(architecture, norm_topk_prob):
    ours, model = _ours_and_theirs(architecture, norm_topk_prob=norm_topk_prob, head_dim=12)
    attention = model.model.layers[0].self_attn
    moe = model.model.layers[0].mlp
    assert ours.head_dim == attention.head_dim
    assert ours.norm_topk_prob == moe.gate.norm_topk_prob == norm_topk_prob
    assert ours.qkv_bias == (attention.q_proj.bias is not None)
    assert ours.o_bias == (attention.o_proj.bias is not None)
    assert (ours.qk_norm != "none") == hasattr(attention, "q_norm")
    if hasattr(attention, "q_norm"):
        per_head = attention.q_norm.weight.shape[0] == attention.head_dim
        assert ours.qk_norm == ("per_head" if per_head else "whole")
    assert ours.intermediate_size == moe.experts.down_proj.shape[-1]
    assert bool(ours.shared_expert_intermediate_size) == hasattr(moe, "shared_expert")


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "DeepseekV3ForCausalLM"])
def test_unsupported_architecture_is_one_line_listing_the_supported(architecture):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_dict({"architectures": [architecture]}, source="config.json")
    message = str(info.value)
    assert "\n" not in message and f"unsupported architecture {architecture!r}" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_qwen2_moe_per_layer_sliding_window_is_refused():
    with pytest.raises(ConfigError, match="use_sliding_window"):
        _ours_and_theirs("Qwen2MoeForCausalLM", use_sliding_window=True, sliding_window=16)
