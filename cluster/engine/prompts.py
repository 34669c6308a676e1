"""Prompts as users give them, made uniform once for the offline ``LLM`` and the HTTP endpoint.

A prompt is text or a list of token ids; a request carries one prompt or a list of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeshard.cluster.text.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or a flat list of token ids) or a list of prompts, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer | None) -> list[int]:
    """Token ids for a prompt; text needs a tokenizer. Ids are checked against the vocabulary when admitted."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: send the prompt as token ids instead of text")
        return tokenizer.encode(prompt)
    return [int(t) for t in prompt]
