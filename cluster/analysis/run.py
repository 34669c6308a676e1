"""The offline routing analysis behind ``moeshard routing``: texts in, routing.json, figures and a token page out.

    read_domains(paths)                       -> {stem: text}        (one-line errors for bad input)
    analyze_routing(model_dir, domains, ...)  -> RoutingAnalysis     (each text tokenized with the model's
                                                                      tokenizer, BOS as it adds it, and prefilled)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeshard.cluster.analysis.report import RoutingReport, build_report
from moeshard.cluster.analysis.token_html import TOKENS_FILE, DomainTokens, token_pieces, write_token_html

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingAnalysis:
    report: RoutingReport
    files: list[Path]  # routing.json, the figures, the token page


def read_domains(paths: Sequence[str | Path]) -> dict[str, str]:
    """{file stem: text}; a missing or empty file, or two files with one stem, is a ValueError/FileNotFoundError."""
    domains: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        if path.stem in domains:
            raise ValueError(f"two inputs are named {path.stem!r}: a domain is named by its file's stem")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"input file {str(path)!r} has no text")
        domains[path.stem] = text
    if not domains:
        raise ValueError("give at least one --input file")
    return domains


def analyze_routing(
    model_dir: str | Path, domains: Mapping[str, str], out_dir: str | Path, expert_actors: int = 0, dtype: str = "float32",
    **engine_options,
) -> RoutingAnalysis:
    """Route every domain's tokens and write the report, its figures and the token page into ``out_dir``.

    ``engine_options`` are further ``EngineConfig`` fields (``max_batch_tokens``: the prefill chunk size).
    """
    from moeshard.cluster.analysis.figures import write_figures  # matplotlib, only when writing
    from moeshard.cluster.engine.llm import LLM

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    out = Path(out_dir)
    with LLM(model_dir, expert_actors=expert_actors, dtype=dtype, **engine_options) as llm:
        if llm.tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer (tokenizer.model or tokenizer.json): its texts cannot be tokenized")
        tokens: dict[str, DomainTokens] = {}
        for name, text in domains.items():
            ids = llm.encode(text)
            logger.info("domain %s: %d tokens", name, len(ids))
            tokens[name] = DomainTokens(ids, token_pieces(llm.tokenizer, ids), llm.route_tokens(ids))
        mc, special = llm.model_config, llm.tokenizer.special_token_ids
    report = build_report(Path(model_dir).name, mc.num_experts, mc.experts_per_token, {n: d.routed for n, d in tokens.items()})
    out.mkdir(parents=True, exist_ok=True)
    files = [report.write(out), *write_figures(report, out)]
    files.append(write_token_html(out / TOKENS_FILE, report.model, mc.num_experts, tokens, special))
    return RoutingAnalysis(report, files)


def format_table(report: RoutingReport) -> str:
    """A Markdown table: per domain, the repetition rates averaged over the MoE layers, beside the random baseline."""

    def mean(values: list[float | None]) -> str:
        present = [v for v in values if v is not None]
        return f"{100 * sum(present) / len(present):.1f}%" if present else "-"

    lines = ["| domain | tokens | same_top1 | shared_any |", "|---|---:|---:|---:|"]
    for name, domain in report.domains.items():
        same, shared = mean([e.same_top1 for e in domain.layers]), mean([e.shared_any for e in domain.layers])
        lines.append(f"| {name} | {domain.tokens} | {same} | {shared} |")
    base = report.random_baseline
    lines.append(f"| random | - | {100 * base.same_top1:.1f}% | {100 * base.shared_any:.1f}% |")
    return "\n".join(lines)
