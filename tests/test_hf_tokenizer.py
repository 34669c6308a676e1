"""HFTokenizer (tokenizer.json + Jinja chat template) against transformers loading the same files."""

import importlib.resources
import json
import shutil

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeshard.cluster.text.detokenizer import IncrementalDetokenizer
from moeshard.cluster.text.hf_tokenizer import HFTokenizer
from moeshard.cluster.text.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    " ",
    "a",
    "Hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces  between   words",
    "line one\nline two\n\n\nline five",
    "\ttabbed\tcolumns\t",
    "你好，世界！这是一个测试。",
    "😀👍🏽🇫🇷 emoji and 🧑‍💻",
    "café naïve résumé Ångström façade",
    "Ελληνικά, русский, 日本語のテキスト, 한국어",
    "€100 and ¥200 — “quotes” …",
    "literal <s> and </s> and <|im_end|> markers",
    "def f(x):\n    return x ** 2  # square\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Good night 🌙"},
    ],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？", "tool_calls": None},
        {"role": "user", "content": "  spaces  and\nnewlines "},
    ],
]

# The Mixtral-Instruct format as a Jinja template, system message folded into the first turn.
MIXTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}

{% else %}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def sentencepiece_model():
    return importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """Mixtral's tokenizer as the Hub ships it in tokenizer.json (legacy Llama layout: BOS added by the post-processor)."""
    slow = tmp_path_factory.mktemp("slow")
    shutil.copy(sentencepiece_model(), slow / "tokenizer.model")
    data = json.loads(transformers.LlamaTokenizer.from_pretrained(slow).backend_tokenizer.to_str())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    data["model"]["unk_token"] = "<unk>"
    path = tmp_path_factory.mktemp("mixtral_hf")
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": MIXTRAL_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A small byte-level BPE (GPT-2/Qwen style) with ChatML, no BOS, and the template in chat_template.jinja."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 3 + [json.dumps(CONVERSATIONS, ensure_ascii=False)], trainer)
    path = tmp_path_factory.mktemp("chatml")
    tk.save(str(path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
              "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


@pytest.fixture(scope="module", params=["mixtral_dir", "chatml_dir"])
def pair(request):
    path = request.getfixturevalue(request.param)
    return load_tokenizer(path), transformers.PreTrainedTokenizerFast.from_pretrained(path)


def test_load_picks_hf_tokenizer(mixtral_dir, chatml_dir):
    for path in (mixtral_dir, chatml_dir):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)


def test_sentencepiece_file_wins_when_both_are_present(mixtral_dir, tmp_path):
    shutil.copytree(mixtral_dir, tmp_path, dirs_exist_ok=True)
    shutil.copy(sentencepiece_model(), tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_special_ids(mixtral_dir, chatml_dir):
    mixtral = load_tokenizer(mixtral_dir)
    assert (mixtral.bos_id, mixtral.eos_id, mixtral.eos_token_ids) == (1, 2, frozenset({2}))
    assert mixtral.special_token_ids == frozenset({0, 1, 2}) and mixtral.vocab_size == 32000
    chatml = load_tokenizer(chatml_dir)
    assert chatml.bos_id is None and chatml.eos_id == 2
    assert chatml.eos_token_ids == frozenset({2, 0})
    assert chatml.special_token_ids == frozenset({0, 1, 2})
    assert chatml.id_to_piece(2) == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    tok, hf = pair
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_matches_transformers(pair, index):
    tok, hf = pair
    messages = CONVERSATIONS[index]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(messages) == expected


def test_chatml_rendering(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_errors_are_value_errors(mixtral_dir):
    tok = load_tokenizer(mixtral_dir)
    with pytest.raises(ValueError, match="Chat template error: Conversation roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="at least one message"):
        tok.encode_chat([])
    with pytest.raises(ValueError, match="Message 0 must be a mapping"):
        tok.encode_chat(["hi"])


def test_missing_or_broken_chat_template(mixtral_dir, tmp_path):
    shutil.copy(mixtral_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok.encode("Hi") == hf.encode("Hi") == [1, tok.encode("Hi", add_bos=False)[0]]  # post-processor adds BOS
    with pytest.raises(ValueError, match="has no chat template"):
        tok.encode_chat([{"role": "user", "content": "Hi"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="Chat template does not parse"):
        load_tokenizer(tmp_path)


def test_unknown_special_token_string_is_an_error(mixtral_dir, tmp_path):
    shutil.copy(mixtral_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' from tokenizer_config.json is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_decode_rejects_ids_outside_vocabulary(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    with pytest.raises(ValueError, match="Token id 600 is outside the vocabulary"):
        tok.decode([5, 600])


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_hf_tokens(pair, text):
    tok, _ = pair
    ids = tok.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(tok)
    for k, token_id in enumerate(ids, start=1):
        delta = detok.push(token_id)
        assert "\ufffd" not in delta
        expected = tok.decode(ids[:k])
        if not expected.endswith("\ufffd"):
            assert detok.text == expected
    detok.finish()
    assert detok.text == tok.decode(ids)
    prompt = tok.encode("Prompt: ")
    with_prompt = IncrementalDetokenizer(tok, prompt_ids=prompt)
    for token_id in ids:
        with_prompt.push(token_id)
    assert tok.decode(prompt) + with_prompt.text == tok.decode(prompt + ids)
