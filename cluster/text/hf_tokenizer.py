"""Hugging Face ``tokenizer.json`` tokenizers (BPE through the ``tokenizers`` library).

The files of a model directory, as ``transformers`` reads them:

    tokenizer.json          the tokenizer, used as written (its post-processor decides BOS)
    tokenizer_config.json   bos/eos token strings, chat_template
    chat_template.jinja     the chat template (wins over tokenizer_config's)
    special_tokens_map.json older home of the special token strings
    config.json             bos/eos ids that override the tokenizer's
    generation_config.json  more ids that end generation

``transformers`` is not needed: ``tokenizers`` does the encoding and ``jinja2``
renders the chat template (see ``chat_format.ChatTemplate``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers

from moeshard.cluster.text.chat_format import ChatTemplate
from moeshard.cluster.text.tokenizer import (
    HF_TOKENIZER_FILE,
    SpecialTokenIds,
    TokenIdProperties,
    check_token_ids,
    read_json,
    read_special_token_ids,
)

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens a chat template sees, as in transformers.
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer(TokenIdProperties):
    """A ``tokenizer.json`` tokenizer with the model's Jinja chat template."""

    def __init__(self, model_dir: str | Path, overrides: SpecialTokenIds | None = None):
        model_dir = self._model_dir = Path(model_dir)
        path = model_dir / HF_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file not found: {path}")
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"Cannot load {path}: {e}") from None
        overrides = overrides if overrides is not None else read_special_token_ids(model_dir)
        config = {**read_json(model_dir / "special_tokens_map.json"), **read_json(model_dir / "tokenizer_config.json")}
        self._token_strings = {name: s for name in TEMPLATE_TOKEN_NAMES if (s := _token_string(config.get(name)))}
        self._vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self._bos_id = overrides.bos_id if overrides.bos_id is not None else self._token_id("bos_token", path)
        eos_ids = overrides.eos_ids or tuple(i for i in [self._token_id("eos_token", path)] if i is not None)
        self._eos_id = eos_ids[0] if eos_ids else None
        self._eos_token_ids = frozenset(eos_ids + overrides.generation_eos_ids)
        check_token_ids([i for i in (self._bos_id, *self._eos_token_ids) if i is not None], self._vocab_size)
        self._special_ids = frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)
        self._chat_template = _load_chat_template(model_dir, config)
        logger.info(
            "loaded tokenizer.json tokenizer from %s: vocab %d, bos %s, eos %s, chat template: %s",
            model_dir.name, self._vocab_size, self._bos_id, sorted(self._eos_token_ids),
            self._chat_template is not None,
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``add_bos``: add the special tokens tokenizer.json's post-processor adds around a text
        (BOS for Llama/Mistral-style tokenizers, nothing for ChatML ones)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(check_token_ids(ids, self._vocab_size), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        (token_id,) = check_token_ids([token_id], self._vocab_size)
        return self._tk.id_to_token(token_id)

    def encode_chat(self, messages: Sequence[Mapping]) -> list[int]:
        """The chat template rendered with the generation prompt, then tokenized as is (no BOS added)."""
        if self._chat_template is None:
            where = f"{CHAT_TEMPLATE_FILE} or chat_template in tokenizer_config.json"
            raise ValueError(f"{self._model_dir} has no chat template ({where})")
        text = self._chat_template.render(messages, self._token_strings, add_generation_prompt=True)
        return self._tk.encode(text, add_special_tokens=False).ids

    def _token_id(self, name: str, path: Path) -> int | None:
        token = self._token_strings.get(name)
        if token is None:
            return None
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} from tokenizer_config.json is not in the vocabulary of {path}")
        return token_id


def _token_string(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_chat_template(model_dir: Path, config: Mapping) -> ChatTemplate | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named templates)."""
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return ChatTemplate(template_file.read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        if "default" not in named:
            raise ValueError(f"tokenizer_config.json in {model_dir} has named chat templates but no 'default'")
        source = named["default"]
    return None if source is None else ChatTemplate(source)
