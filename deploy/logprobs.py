"""Token logprobs in OpenAI's response shapes, for completions (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``) and chat (``content``: token, logprob, bytes, top_logprobs).

A token's text is what it adds to the text before it (decoded with a few tokens of context), so
SentencePiece's leading spaces and multi-token characters come out as they read in the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moeshard.cluster.engine.logprobs import TokenLogprobs
from moeshard.cluster.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CONTEXT_TOKENS = 4  # tokens decoded before a token to find the text it adds


@dataclass(frozen=True)
class CompletionLogprobs:
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def join(parts: list["CompletionLogprobs"]) -> "CompletionLogprobs":
        return CompletionLogprobs(*([x for part in parts for x in getattr(part, name)] for name in _COMPLETION_FIELDS))


_COMPLETION_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def token_text(tokenizer: Tokenizer | None, context: list[int], token_id: int) -> str:
    """The text ``token_id`` adds after ``context`` (the ids before it)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    window = context[-CONTEXT_TOKENS:]
    before = tokenizer.decode(window, skip_special_tokens=False)
    both = tokenizer.decode(window + [token_id], skip_special_tokens=False)
    return both[len(before) :] if both.startswith(before) else tokenizer.decode([token_id], skip_special_tokens=False)


class ChoiceLogprobs:
    """One choice's logprobs, formatted as its tokens come (streamed or all at once); keeps the context and offset."""

    def __init__(self, tokenizer: Tokenizer | None, context: list[int], text_offset: int = 0):
        self.tokenizer = tokenizer
        self.context = list(context)  # the ids before the next token
        self.text_offset = text_offset

    def _text(self, token_id: int) -> str:
        return token_text(self.tokenizer, self.context, token_id)

    def completion(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> CompletionLogprobs:
        """Completions' shape for the next ``token_ids``; the sampled token is always among its top_logprobs."""
        assert len(token_ids) == len(entries), f"{len(entries)} logprobs for {len(token_ids)} tokens"
        out = CompletionLogprobs([], [], [], [])
        for token_id, entry in zip(token_ids, entries):
            text = self._text(token_id)
            out.tokens.append(text)
            out.text_offset.append(self.text_offset)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                top = {self._text(i): lp for i, lp in entry.top}
                top.setdefault(text, entry.logprob)
                out.token_logprobs.append(entry.logprob)
                out.top_logprobs.append(top)
            self.context.append(token_id)
            self.text_offset += len(text)
        return out

    def with_prompt(
        self,
        prompt_ids: list[int],
        prompt_entries: list[TokenLogprobs | None] | None,
        token_ids: list[int],
        entries: list[TokenLogprobs] | None,
    ) -> dict:
        """Completions' ``logprobs`` for the next tokens, after the prompt's when they came (``echo``)."""
        parts = [] if prompt_entries is None else [self.completion(prompt_ids, prompt_entries)]
        parts.append(self.completion(token_ids, entries or []))
        return CompletionLogprobs.join(parts).as_dict()

    def chat(self, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
        """Chat's shape for the next ``token_ids``: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        assert len(token_ids) == len(entries), f"{len(entries)} logprobs for {len(token_ids)} tokens"
        content = []
        for token_id, entry in zip(token_ids, entries):
            top = [_chat_token(self._text(i), lp) for i, lp in entry.top]
            content.append({**_chat_token(self._text(token_id), entry.logprob), "top_logprobs": top})
            self.context.append(token_id)
        return {"content": content}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
