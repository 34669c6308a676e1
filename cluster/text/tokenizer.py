"""Tokenizers: text <-> token ids at the edges of the engine.

The engine moves token ids only; everything that touches text goes through the
``Tokenizer`` interface here (and ``detokenizer.py`` for streaming).
``load_tokenizer(model_dir)`` picks the implementation from the files present:

    tokenizer.model   -> SentencePieceTokenizer (Mixtral; Mixtral-Instruct chat format)
    tokenizer.json    -> HFTokenizer (hf_tokenizer.py; the model's Jinja chat template)

Special token ids come from the tokenizer file and may be overridden by the
model directory's ``config.json`` (``bos_token_id``, ``eos_token_id``);
``generation_config.json``'s ``eos_token_id`` adds ids that end generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece

from moeshard.cluster.text.chat_format import SpecialToken, mistral_instruct_segments, parse_messages

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine's edges need from a tokenizer."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end generation."""
        ...

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids that ``decode(..., skip_special_tokens=True)`` drops."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def encode_chat(self, messages: Sequence[Mapping]) -> list[int]:
        """The model's chat format for ``messages``, ending with the generation prompt."""
        ...


@dataclass(frozen=True)
class SpecialTokenIds:
    """Overrides read from a model directory; None / () where the files say nothing."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    generation_eos_ids: tuple[int, ...] = ()


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face style model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"Model directory not found: {model_dir}")
    overrides = read_special_token_ids(model_dir)
    if (model_dir / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(model_dir / SENTENCEPIECE_FILE, overrides)
    if (model_dir / HF_TOKENIZER_FILE).is_file():
        from moeshard.cluster.text.hf_tokenizer import HFTokenizer  # needs `tokenizers` and `jinja2`

        return HFTokenizer(model_dir, overrides)
    raise FileNotFoundError(f"No tokenizer in {model_dir}: looked for {', '.join(TOKENIZER_FILES)}")


def read_special_token_ids(model_dir: Path) -> SpecialTokenIds:
    """bos/eos ids from ``config.json`` and ``generation_config.json``, where present."""
    config = read_json(model_dir / "config.json")
    generation = read_json(model_dir / "generation_config.json")
    bos = config.get("bos_token_id")
    if bos is not None and not isinstance(bos, int):
        raise ValueError(f"bos_token_id in {model_dir / 'config.json'} must be an int, got {bos!r}")
    return SpecialTokenIds(
        bos_id=bos,
        eos_ids=_id_list(config.get("eos_token_id"), model_dir / "config.json"),
        generation_eos_ids=_id_list(generation.get("eos_token_id"), model_dir / "generation_config.json"),
    )


def read_json(path: Path) -> dict:
    """A JSON object file; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _id_list(value: object, source: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"eos_token_id in {source} must be an int or a list of ints, got {value!r}")
    return tuple(values)


class TokenIdProperties:
    """The id properties every tokenizer exposes, from attributes its ``__init__`` sets."""

    _bos_id: int | None
    _eos_id: int | None
    _eos_token_ids: frozenset[int]
    _special_ids: frozenset[int]
    _vocab_size: int

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class SentencePieceTokenizer(TokenIdProperties):
    """A SentencePiece model (Mixtral's ``tokenizer.model``) with the Mixtral-Instruct chat format."""

    def __init__(self, model_file: str | Path, overrides: SpecialTokenIds = SpecialTokenIds()):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._vocab_size = self._sp.vocab_size()
        bos = overrides.bos_id if overrides.bos_id is not None else _id_or_none(self._sp.bos_id())
        eos_ids = overrides.eos_ids or tuple(i for i in [_id_or_none(self._sp.eos_id())] if i is not None)
        for token_id in (bos, *eos_ids, *overrides.generation_eos_ids):
            if token_id is not None and not 0 <= token_id < self._vocab_size:
                raise ValueError(f"Special token id {token_id} is outside the vocabulary of {model_file}")
        self._bos_id = bos
        self._eos_id = eos_ids[0] if eos_ids else None
        self._eos_token_ids = frozenset(eos_ids + overrides.generation_eos_ids)
        self._special_ids = frozenset(i for i in range(self._vocab_size) if self._sp.is_control(i))
        logger.info(
            "loaded SentencePiece tokenizer %s: vocab %d, bos %s, eos %s",
            model_file.name, self._vocab_size, self._bos_id, sorted(self._eos_token_ids),
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = check_token_ids(ids, self._vocab_size)
        if skip_special_tokens:
            return self._sp.decode(ids)  # SentencePiece drops control tokens itself
        # Keep control tokens as their pieces; decode the text runs between them.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._special_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str:
        (token_id,) = check_token_ids([token_id], self._vocab_size)
        return self._sp.id_to_piece(token_id)

    def encode_chat(self, messages: Sequence[Mapping]) -> list[int]:
        """Mixtral-Instruct: token-for-token what mistral-common's v1 tokenizer produces."""
        ids: list[int] = []
        for segment in mistral_instruct_segments(parse_messages(messages)):
            if segment is SpecialToken.BOS:
                ids += [] if self._bos_id is None else [self._bos_id]
            elif segment is SpecialToken.EOS:
                ids += [] if self._eos_id is None else [self._eos_id]
            else:
                ids += self._sp.encode(segment)
        return ids


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as plain ints; ValueError naming the first one outside [0, vocab_size)."""
    ids = [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"Token id {bad} is outside the vocabulary (size {vocab_size})")
    return ids


def _id_or_none(token_id: int) -> int | None:
    """SentencePiece reports a missing special token as -1."""
    return token_id if token_id >= 0 else None
