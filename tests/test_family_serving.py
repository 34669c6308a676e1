"""Qwen-MoE models served with their own tokenizer.json and ChatML chat template, against transformers.

The tokenizer is a small byte-level BPE (Qwen's kind) built with the
``tokenizers`` package; the chat template (ChatML, as Qwen ships it) sits in
tokenizer_config.json. The oracles are transformers' own: AutoTokenizer's
apply_chat_template for the prompt ids, the model class's greedy generate and
the tokenizer's decode for the reply.
"""

from __future__ import annotations

import json

import openai
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeshard.cluster.text.tokenizer import load_tokenizer

API_KEY = "test-key"
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. Answer in French. Good morning, bonjour!",
    "Mixture of experts models route each token to a few experts; 128 experts, top 8.",
    "system user assistant: the quick brown fox jumps over the lazy dog 0123456789",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"}],
]
MODELS = {
    "/": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[2], num_experts=32, num_experts_per_tok=8), 2),
    "/qwen3": ("Qwen3MoeForCausalLM", dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=True), 0),
}


def _write_tokenizer(path) -> int:
    """Train a byte-level BPE with the ChatML specials; returns its vocabulary size."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 3, trainer)
    tk.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tk.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def model_dirs(tiny_family_factory, tmp_path_factory):
    dirs = {}
    for prefix, (architecture, overrides, _) in MODELS.items():
        tokenizer_dir = tmp_path_factory.mktemp("tok")
        vocab = _write_tokenizer(tokenizer_dir)
        eos = json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"][2]["id"]  # <|im_end|>
        path = tiny_family_factory(f"serve_{architecture}", architecture, seed=7, vocab_size=vocab, eos_token_id=eos, **overrides)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).write_text((tokenizer_dir / name).read_text())
        dirs[prefix] = path
    return dirs


@pytest.fixture(scope="module")
def server(model_dirs, live_server):
    apps = {
        prefix: {"model_dir": str(model_dirs[prefix]), "model_name": "tiny", "api_key": API_KEY, "expert_actors": actors}
        for prefix, (_, _, actors) in MODELS.items()
    }
    with live_server(apps, num_cpus=6) as base_url:
        yield base_url


@pytest.mark.parametrize("prefix", sorted(MODELS))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_prompt_ids_match_transformers(model_dirs, prefix, index):
    path = model_dirs[prefix]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    expected = hf.apply_chat_template(CONVERSATIONS[index], add_generation_prompt=True, return_dict=False)
    assert load_tokenizer(path).encode_chat(CONVERSATIONS[index]) == expected
    assert hf.decode(expected).startswith("<|im_start|>system\n")


@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_served_chat_equals_transformers(server, model_dirs, prefix):
    architecture = MODELS[prefix][0]
    path = model_dirs[prefix]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    reference = getattr(transformers, architecture).from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    client = openai.OpenAI(base_url=f"{server}{prefix.rstrip('/')}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for messages in CONVERSATIONS:
        prompt = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        generated = out[0, len(prompt) :].tolist()
        eos = reference.config.eos_token_id
        finish = "stop" if eos in generated else "length"
        generated = generated[: generated.index(eos)] if eos in generated else generated
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.choices[0].message.content == hf.decode(generated, skip_special_tokens=True)
        assert reply.choices[0].finish_reason == finish
