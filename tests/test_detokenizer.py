"""IncrementalDetokenizer: streamed deltas add up to what decode gives, held back only mid-character."""

import importlib.resources
import random
import shutil

import pytest

from moeshard.cluster.text.detokenizer import IncrementalDetokenizer
from moeshard.cluster.text.tokenizer import load_tokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing spaces  ",
    "multiple   spaces  between   words",
    "line one\nline two\n\n\nline five\n",
    "\ttabbed\tcolumns\t",
    "你好，世界！这是一个测试。",
    "😀👍🏽🇫🇷 emoji and 🧑‍💻 and 🦜🪿",
    "café naïve résumé Ångström façade",
    "Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "mixed 中文 and English 😀 in one line",
    "€100 and ¥200 — “quotes” …",
    "<s> literal [INST] markers [/INST] </s>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters 𓀀𓁐",
    "def f(x):\n    return x ** 2  # square\n",
    "The quick brown fox jumps over the lazy dog. " * 10,
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    return load_tokenizer(path)


def stream(tok, ids, prompt_ids=None):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finish())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_decode_at_every_step(tok, text):
    ids = tok.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(tok)
    for k, token_id in enumerate(ids, start=1):
        delta = detok.push(token_id)
        assert REPLACEMENT not in delta
        expected = tok.decode(ids[:k])
        if not expected.endswith(REPLACEMENT):  # the text is complete here
            assert detok.text == expected
        else:
            assert expected.startswith(detok.text)
    assert detok.finish() == ""
    assert detok.text == tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_progressive(tok, text):
    ids = tok.encode(text, add_bos=False)
    _, deltas = stream(tok, ids)
    # Held back only: tokens inside a multi-byte character (byte fallback), and a lone
    # first "▁", whose space shows once the next token arrives.
    held = sum(tok.id_to_piece(i).startswith("<0x") for i in ids) + (tok.id_to_piece(ids[0]) == "▁")
    assert sum(bool(d) for d in deltas) >= len(ids) - held


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("🦜", add_bos=False)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]  # byte fallback
    detok, deltas = stream(tok, ids)
    assert deltas[-5:] == ["", "", "", "🦜", ""]
    assert detok.text == tok.decode(ids)


def test_first_token_space_follows_decode_without_prompt(tok):
    ids = tok.encode("Paris is nice", add_bos=False)
    assert tok.id_to_piece(ids[0]) == "▁Paris"
    detok, deltas = stream(tok, ids)
    assert deltas[0] == "Paris" and detok.text == tok.decode(ids)


def test_with_prompt_text_continues_the_prompt(tok):
    prompt = tok.encode("The capital of France is")
    generated = tok.encode("Paris, and 中文 😀 follows.", add_bos=False)
    detok, deltas = stream(tok, generated, prompt_ids=prompt)
    full = tok.decode(prompt + generated)
    assert deltas[0] == " Paris"
    assert tok.decode(prompt) + detok.text == full


def test_with_chat_prompt(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    generated = tok.encode("Hello! 😀", add_bos=False)
    detok, _ = stream(tok, generated, prompt_ids=prompt)
    assert tok.decode(prompt) + detok.text == tok.decode(prompt + generated)
    chat_detok, _ = stream(tok, generated)
    assert chat_detok.text == "Hello! 😀"


@pytest.mark.parametrize("text", TEXTS)
def test_split_anywhere_with_prompt(tok, text):
    ids = tok.encode(text)
    for split in range(1, len(ids) + 1, max(1, len(ids) // 7)):
        prefix = tok.decode(ids[:split])
        if prefix.endswith(REPLACEMENT):
            continue  # a prompt that ends inside a character has no text boundary
        detok, _ = stream(tok, ids[split:], prompt_ids=ids[:split])
        assert prefix + detok.text == tok.decode(ids)


def test_special_tokens_are_skipped(tok):
    ids = [tok.bos_id, *tok.encode("one", add_bos=False), tok.eos_id, *tok.encode("two 🦜", add_bos=False), tok.eos_id]
    detok, deltas = stream(tok, ids)
    assert detok.text == tok.decode(ids) == "one two 🦜"
    assert deltas[0] == "" and deltas[-2] == ""
    assert detok.num_tokens == len(ids)


def test_special_tokens_kept_when_asked(tok):
    ids = [*tok.encode("one", add_bos=False), tok.eos_id]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(detok.push(i) for i in ids) == tok.decode(ids, skip_special_tokens=False) == "one</s>"


def test_unfinished_character_is_flushed_by_finish(tok):
    f0 = tok.encode("🦜", add_bos=False)[-4]
    assert tok.id_to_piece(f0) == "<0xF0>"
    ids = [*tok.encode("price", add_bos=False), f0]
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids] == ["price", ""]
    assert detok.finish() == REPLACEMENT
    assert detok.text == tok.decode(ids)


def test_random_token_streams_match_decode(tok):
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tok.vocab_size) for _ in range(30)]
        detok, _ = stream(tok, ids)
        assert detok.text == tok.decode(ids)


class CountingTokenizer:
    """Forwards to a tokenizer and records the longest id list decoded."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_work_per_token_is_bounded(tok):
    counting = CountingTokenizer(tok)
    ids = tok.encode("A long generation with 中文 and emoji 😀 in it. " * 200, add_bos=False)
    detok, _ = stream(counting, ids, prompt_ids=tok.encode("prompt " * 500))
    assert len(ids) > 2000
    assert counting.longest <= 12
    assert tok.decode(tok.encode("prompt " * 500)) + detok.text == tok.decode(tok.encode("prompt " * 500) + ids)


def test_long_run_of_invalid_bytes_is_not_held_forever(tok):
    continuation = tok.encode("🦜", add_bos=False)[-1]  # a lone UTF-8 continuation byte is invalid
    assert tok.id_to_piece(continuation) == "<0x9C>"
    ids = [continuation] * 20 + tok.encode("ok", add_bos=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert any(deltas[:20])
    assert detok.text == tok.decode(ids)
