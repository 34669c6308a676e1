"""A Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from a GGUF file's metadata.

A GGUF carries its tokenizer as metadata (llama.cpp's key names):

    tokenizer.ggml.model        "gpt2": byte-level BPE (the only kind built here)
    tokenizer.ggml.tokens       the vocabulary, id order, spelled in GPT-2's byte alphabet
    tokenizer.ggml.merges       "left right" pairs, best first
    tokenizer.ggml.token_type   3 = control (a special token), 4 = user-defined (an added token)
    tokenizer.ggml.*_token_id   bos / eos / unknown / padding
    tokenizer.ggml.pre          how text is split before BPE (llama.cpp's pre-tokenizer name)
    tokenizer.ggml.add_bos_token / add_eos_token  what encoding a text adds around it
    tokenizer.chat_template     the Jinja chat template

The result gives the ids transformers' tokenizer for the same file gives
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``): a BPE model over the
vocabulary and merges, GPT-2's byte-level pre-tokenizer and decoder, the
control tokens added as special tokens, and BOS/EOS added only when the file
says so. For ``smollm`` digits are split one by one first, as in SmolLM2's own
tokenizer.json and in llama.cpp (its vocabulary has no multi-digit tokens, so
the ids are the same either way).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import PreTokenizer

from moeshard.cluster.convert.gguf_reader import GGUFError, GGUFFile

logger = logging.getLogger(__name__)

BYTE_LEVEL_MODEL = "gpt2"
CONTROL, USER_DEFINED = 3, 4
SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# llama.cpp pre-tokenizer names that split text as GPT-2 does (smollm: digits one by one first).
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "smollm")


@dataclass
class GGUFTokenizerFiles:
    """What goes into a model directory: tokenizer.json and tokenizer_config.json."""

    tokenizer: Tokenizer
    config: dict  # tokenizer_config.json: special token strings, add_bos_token, chat_template

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def byte_level_spelling(token: str) -> str:
    """A token as the byte-level vocabulary spells it: kept when already in the alphabet, else re-spelled."""
    alphabet = byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def build_gguf_tokenizer(gguf: GGUFFile) -> GGUFTokenizerFiles:
    """The byte-level BPE tokenizer and its config described by ``gguf``'s metadata."""
    kind = gguf.required_field("tokenizer.ggml.model")
    if kind != BYTE_LEVEL_MODEL:
        raise GGUFError(
            f"{gguf.path}: tokenizer model {kind!r} is not supported; expected {BYTE_LEVEL_MODEL!r} (byte-level BPE)"
        )
    tokens: list[str] = gguf.required_field("tokenizer.ggml.tokens")
    token_types: list[int] = gguf.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in gguf.required_field("tokenizer.ggml.merges")]
    vocab = {byte_level_spelling(token): index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{gguf.path}: the vocabulary has duplicate tokens ({len(tokens) - len(vocab)})")

    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(gguf)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    in_alphabet = set(byte_alphabet().values())
    # A control token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocabulary.
    special = [t for t, kind in zip(tokens, token_types) if kind == CONTROL and set(t) <= in_alphabet]
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    config = _tokenizer_config(gguf, tokens)
    tokenizer.post_processor = _post_processor(config, vocab)
    logger.info(
        "built a byte-level BPE tokenizer from %s: %d tokens, %d merges, %d special",
        gguf.path.name, len(vocab), len(merges), len(special),
    )
    return GGUFTokenizerFiles(tokenizer=tokenizer, config=config)


def _pre_tokenizer(gguf: GGUFFile) -> PreTokenizer:
    name = gguf.field("tokenizer.ggml.pre", "default")
    if name not in GPT2_PRE_TOKENIZERS:
        supported = ", ".join(GPT2_PRE_TOKENIZERS)
        raise GGUFError(f"{gguf.path}: pre-tokenizer {name!r} is not supported; supported: {supported}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _post_processor(config: dict, vocab: dict[str, int]) -> processors.TemplateProcessing:
    """BOS / EOS around an encoded text, where the file asks for them."""
    before = [config["bos_token"]] if config["add_bos_token"] and "bos_token" in config else []
    after = [config["eos_token"]] if config["add_eos_token"] and "eos_token" in config else []
    single = [*before, "$A", *after]
    pair = [*single, *before, "$B:1", *after]
    special = [(t, vocab[byte_level_spelling(t)]) for t in dict.fromkeys(before + after)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def _tokenizer_config(gguf: GGUFFile, tokens: list[str]) -> dict:
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        token_id = gguf.field(key)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{gguf.path}: {key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
        config[name] = tokens[token_id]
    config["add_bos_token"] = bool(gguf.field("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(gguf.field("tokenizer.ggml.add_eos_token", False))
    config["clean_up_tokenization_spaces"] = False
    architecture = gguf.field("general.architecture")
    context = gguf.field(f"{architecture}.context_length")
    if context is not None:
        config["model_max_length"] = int(context)
    template = gguf.field("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return config
