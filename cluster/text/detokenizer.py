"""Streaming detokenisation: one token id in, the new text out.

Decoding tokens one at a time is wrong in two ways:

- SentencePiece drops the leading space of the first piece it decodes, so
  decoding ``▁world`` alone gives ``world`` where the sequence reads `` world``;
- byte-fallback tokens (``<0xE2>``, ``<0x82>``, ``<0xAC>`` for ``€``) are not
  text until the whole character has arrived; a partial one decodes to U+FFFD.

So each ``push`` decodes a short window (the tokens of the previous delta, the
*prefix*, plus the tokens not yet emitted) and emits what the window's text has
beyond the prefix's text. While the window's text ends with U+FFFD the delta is
held back. Both decodes start at the same token, so whatever the tokenizer does
to the start of a text cancels out. The window is a few tokens long, so a push
costs O(1) however long the generation.

Text semantics:

- without ``prompt_ids``, ``text`` equals ``tokenizer.decode(generated_ids)``
  (a leading space of the first token is dropped, as decode drops it): the
  content of a chat reply;
- with ``prompt_ids``, the last few prompt tokens are the first prefix, so
  ``text`` is what the generated tokens add to the prompt's text,
  ``decode(prompt + generated)[len(decode(prompt)):]``: a completion that
  is appended to its prompt keeps its leading space.

Special tokens are skipped (when ``skip_special_tokens``): they never enter the
window and produce no text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from moeshard.cluster.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as the first prefix: enough for a 4-byte character in byte tokens plus one.
PROMPT_CONTEXT_TOKENS = 6
# Tokens held back at most while the text ends in U+FFFD (a UTF-8 character is at most 4 bytes;
# beyond this the bytes are invalid and are emitted as U+FFFD, as decode would show them).
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._special_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        # window = the prefix tokens (window[:read]) followed by the tokens not yet emitted.
        self._window: list[int] = self._prompt_context(prompt_ids or ())
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._chunks: list[str] = []
        self._num_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_tokens(self) -> int:
        """Generated tokens pushed so far, special ones included."""
        return self._num_tokens

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly "")."""
        self._num_tokens += 1
        if token_id in self._special_ids:
            return ""
        self._window.append(int(token_id))
        window_text = self._decode(self._window)
        pending = len(self._window) - self._read
        if window_text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS:
            return ""  # a character split over byte tokens: wait for the rest
        return self._emit(window_text)

    def finish(self) -> str:
        """Emit whatever is held back (an unfinished character decodes to U+FFFD)."""
        if self._read == len(self._window):
            return ""
        return self._emit(self._decode(self._window))

    def _emit(self, window_text: str) -> str:
        delta = window_text[len(self._prefix_text):]
        if not delta:
            return ""  # e.g. a lone leading "▁", whose space shows only once text follows it
        # The tokens just emitted become the next prefix.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._chunks.append(delta)
        return delta

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        context: list[int] = []
        for token_id in reversed(prompt_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._special_ids:
                context.append(int(token_id))
        context.reverse()
        return context

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
