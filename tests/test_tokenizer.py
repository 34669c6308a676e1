"""SentencePieceTokenizer against SentencePiece itself, on Mixtral's real tokenizer model."""

import importlib.resources
import json
import shutil

import pytest
import sentencepiece

from moeshard.cluster.text.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "",
    " ",
    "   ",
    "a",
    "Hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces  between   words",
    "\n",
    "line one\nline two\n\n\nline five",
    "\ttabbed\tcolumns\t",
    "你好，世界！这是一个测试。",
    "😀👍🏽🇫🇷 emoji and 🧑‍💻",
    "café naïve résumé Ångström façade",
    "Ελληνικά, русский,日本語のテキスト, 한국어, العربية",
    "mixed 中文 and English 😀 in one line",
    "€100 and ¥200 — “quotes” …",
    "<s> literal [INST] markers [/INST] </s>",
    "zero\u200bwidth and combining e\u0301",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "def f(x):\n    return x ** 2  # square\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def mistral_tokenizer_model():
    return importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    shutil.copy(mistral_tokenizer_model(), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_model()))


def test_load_picks_sentencepiece(tok):
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.special_token_ids == frozenset({1, 2})
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_sentencepiece(tok, sp, text):
    ids = tok.encode(text)
    assert ids == [sp.bos_id(), *sp.encode(text)]
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


def test_decode_keeps_special_tokens_when_asked(tok):
    ids = [*tok.encode("Hello world"), tok.eos_id]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hello world</s>"


def test_decode_accepts_any_int_sequence(tok):
    import numpy as np

    ids = tok.encode("numpy ids")
    assert tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == "numpy ids"


@pytest.mark.parametrize("bad", [-1, 32000, 10**9])
def test_decode_rejects_ids_outside_vocabulary(tok, bad):
    with pytest.raises(ValueError, match=f"Token id {bad} is outside the vocabulary"):
        tok.decode([1, bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_piece(bad)


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="encode expects a str"):
        tok.encode(b"bytes")


def test_config_json_overrides_special_ids(tmp_path):
    shutil.copy(mistral_tokenizer_model(), tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [7, 2]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 5 and tok.eos_id == 7
    assert tok.eos_token_ids == frozenset({7, 2, 9})
    assert tok.encode("hi")[0] == 5


def test_config_json_with_bad_ids_is_an_error(tmp_path):
    shutil.copy(mistral_tokenizer_model(), tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match="eos_token_id in .*config.json must be an int"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 40000}))
    with pytest.raises(ValueError, match="Special token id 40000 is outside the vocabulary"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_file_names_directory_and_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "tokenizer.json" in message
    assert "\n" not in message


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="Model directory not found"):
        load_tokenizer(tmp_path / "nope")


def test_malformed_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="Cannot load .*tokenizer.json"):
        load_tokenizer(tmp_path)
