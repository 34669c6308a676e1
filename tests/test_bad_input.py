"""Bad models and bad requests fail with a one-line message naming the problem, and load nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model import checkpoint as checkpoint_module
from moeshard.cluster.model.checkpoint import CheckpointError, CheckpointReader, ExpertKey
from moeshard.cluster.model.config import ConfigError, ModelConfig


@pytest.fixture()
def model_copy(tiny_mixtral_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_mixtral_dir, target)
    return target


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


def test_unsupported_architecture(model_copy):
    _edit_config(model_copy, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError) as info:
        LLM(model_copy)
    assert "unsupported architecture 'LlamaForCausalLM'" in _one_line(info.value)


@pytest.mark.parametrize("field", ["num_local_experts", "hidden_size", "num_experts_per_tok", "rms_norm_eps"])
def test_missing_config_field(model_copy, field):
    _edit_config(model_copy, **{field: None})
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_model_dir(model_copy)
    assert f"missing field '{field}'" in _one_line(info.value)


def test_inconsistent_config(model_copy):
    _edit_config(model_copy, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="num_experts_per_tok|experts_per_token"):
        ModelConfig.from_model_dir(model_copy)


def test_rope_theta_from_either_field(model_copy):
    _edit_config(model_copy, rope_parameters=None, rope_theta=5000.0)
    assert ModelConfig.from_model_dir(model_copy).rope_theta == 5000.0
    _edit_config(model_copy, rope_theta=None)
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_model_dir(model_copy)


def test_pickle_checkpoint_is_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        LLM(model_copy)
    message = _one_line(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "convert" in message.lower()


def test_missing_key_names_key(model_copy):
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        LLM(model_copy)
    assert "model.layers.1.self_attn.k_proj.weight" in _one_line(info.value)


def test_wrong_shape_names_key_and_file_and_reads_nothing(model_copy, monkeypatch):
    tensors = load_file(model_copy / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, model_copy / "model.safetensors")

    reads = []
    real_safe_open = checkpoint_module.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self._handle.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._handle, name)

    monkeypatch.setattr(checkpoint_module, "safe_open", CountingHandle)
    config = ModelConfig.from_model_dir(model_copy)
    reader = CheckpointReader(model_copy, config)
    wanted = [ExpertKey(layer, e) for layer in range(config.num_layers) for e in range(config.num_experts)]
    with pytest.raises(CheckpointError) as info:
        reader.read_experts(wanted, torch.float32)
    message = _one_line(info.value)
    assert key in message and "model.safetensors" in message and "[3, 3]" in message
    assert reads == []  # validated before any tensor was read: nothing half-loaded


def test_sharded_checkpoint_reads_only_requested_keys(tiny_mixtral_dir, tmp_path):
    """A two-file checkpoint with an index: the reader finds keys in both and returns only what was asked."""
    tensors = load_file(tiny_mixtral_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    target = tmp_path / "sharded"
    target.mkdir()
    shutil.copy(tiny_mixtral_dir / "config.json", target / "config.json")
    for file_name, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, target / file_name)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    config = ModelConfig.from_model_dir(target)
    experts = CheckpointReader(target, config).read_experts([ExpertKey(1, 3)], torch.float32)
    assert list(experts) == [ExpertKey(1, 3)]
    assert torch.equal(experts[ExpertKey(1, 3)].w2, tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"])
    with LLM(target) as sharded, LLM(tiny_mixtral_dir) as single:
        assert torch.equal(sharded.logits([1, 2, 3]), single.logits([1, 2, 3]))


def test_bad_requests(tiny_mixtral_dir):
    with LLM(tiny_mixtral_dir) as llm:
        with pytest.raises(ValueError, match="maximum context length is 256 tokens, but 300"):
            llm.generate([[1] * 200], SamplingParams(max_tokens=100))
        with pytest.raises(ValueError, match="empty"):
            llm.generate([[]], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate("text needs a tokenizer", SamplingParams(max_tokens=4))
        with pytest.raises(ValueError):
            SamplingParams(max_tokens=0)
        with pytest.raises(ValueError):
            SamplingParams(max_tokens=4, top_p=1.5)
        with pytest.raises(ValueError):
            SamplingParams(max_tokens=4, temperature=-1)
        # The engine is still healthy after every refusal.
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) >= 1
