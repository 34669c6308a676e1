"""An HTML page of each domain's text with every token coloured by its first-choice expert (the Mixtral paper's figure 8).

A few MoE layers are shown (the first, the middle and the last); hovering a token shows its id and the
experts it was routed to at that layer. Token texts come from the incremental detokenizer, so the pieces
of a domain concatenate to its decoded text; special tokens (BOS) show as their piece. Every piece is
HTML-escaped.

Dimensions: T tokens, L_moe MoE layers, K chosen per token.
"""

from __future__ import annotations

import colorsys
import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeshard.cluster.analysis.capture import RoutedTokens
from moeshard.cluster.text.detokenizer import IncrementalDetokenizer
from moeshard.cluster.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.html"
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}"
    ".text{white-space:pre-wrap;font-family:monospace;line-height:1.9;border:1px solid #ccc;padding:.8em}"
    ".text span{border-radius:2px}.special{font-style:italic;opacity:.7}"
    ".legend span{display:inline-block;padding:0 .4em;margin:0 .2em .2em 0;font-family:monospace}"
)


@dataclass(frozen=True)
class DomainTokens:
    """One domain's tokens, their texts and their routing."""

    token_ids: list[int]  # [T]
    pieces: list[str]  # [T]: each token's text
    routed: RoutedTokens


def shown_layers(layers: Sequence[int]) -> list[int]:
    """The first, middle and last MoE layer (fewer when the model has fewer)."""
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []


def expert_colour(expert: int, num_experts: int) -> str:
    """A light colour per expert, hues spread around the wheel."""
    r, g, b = colorsys.hls_to_rgb(expert / num_experts, 0.78, 0.85)
    return f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}"


def token_pieces(tokenizer: Tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token's text: special tokens as their piece, the rest as the detokenizer emits them."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    special = tokenizer.special_token_ids
    return [tokenizer.id_to_piece(t) if t in special else detokenizer.push(t) for t in token_ids]


def write_token_html(
    path: Path, model: str, num_experts: int, domains: Mapping[str, DomainTokens], special_ids: frozenset[int] = frozenset()
) -> Path:
    """One section per domain, one coloured copy of its text per shown layer."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(model)}: routing</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(model)}: first-choice expert of every token</h1>", _legend(num_experts)]  # fmt: skip
    for name, domain in domains.items():
        parts.append(f"<h2>{html.escape(name)} ({len(domain.token_ids)} tokens)</h2>")
        for layer in shown_layers(domain.routed.layers):
            ids = domain.routed.expert_ids[domain.routed.layers.index(layer)].tolist()  # [T, K]
            parts.append(f"<h3>layer {layer}</h3><div class='text'>")
            for t, piece, experts in zip(domain.token_ids, domain.pieces, ids):
                parts.append(_token_span(t, piece, experts, num_experts, t in special_ids))
            parts.append("</div>")
    parts.append("</body></html>\n")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def _token_span(token_id: int, piece: str, experts: list[int], num_experts: int, special: bool) -> str:
    title = html.escape(f"token {token_id}: experts {experts}", quote=True)
    cls = " class='special'" if special else ""
    colour = expert_colour(experts[0], num_experts)
    return f"<span{cls} style='background:{colour}' title='{title}'>{html.escape(piece, quote=True)}</span>"


def _legend(num_experts: int) -> str:
    spans = "".join(f"<span style='background:{expert_colour(e, num_experts)}'>expert {e}</span>" for e in range(num_experts))
    return f"<p class='legend'>{spans}</p>"
