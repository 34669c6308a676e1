"""The report's figures (matplotlib, Agg backend: no display needed), drawn from the ``RoutingReport`` alone.

    expert_share.png   each expert's share of routed (token, choice) pairs, one panel per MoE layer,
                       a bar per domain (the Mixtral paper's figure 7); dashed: the uniform share 1/E
    repetition.png     same_top1 and shared_any per MoE layer by domain, against the random
                       baselines (the paper's table 5, drawn per layer)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from moeshard.cluster.analysis.report import RoutingReport  # noqa: E402

logger = logging.getLogger(__name__)

EXPERT_SHARE_FILE = "expert_share.png"
REPETITION_FILE = "repetition.png"
PANEL_COLUMNS = 4


def write_figures(report: RoutingReport, out_dir: Path) -> list[Path]:
    paths = []
    for figure, name in ((expert_share_figure(report), EXPERT_SHARE_FILE), (repetition_figure(report), REPETITION_FILE)):
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        paths.append(out_dir / name)
    return paths


def expert_share_figure(report: RoutingReport) -> Figure:
    """One panel per MoE layer (its title names the layer); in each, one bar series per domain, in domain order."""
    names = list(report.domains)
    layers = [entry.layer for entry in report.domains[names[0]].layers]
    columns = min(PANEL_COLUMNS, len(layers))
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False, sharey=True)
    width = 0.8 / len(names)
    for i, layer in enumerate(layers):
        ax = axes[i // columns][i % columns]
        for d, name in enumerate(names):
            share = report.domains[name].layers[i].expert_share  # [E]
            ax.bar([e - 0.4 + width * (d + 0.5) for e in range(report.experts)], share, width, label=name)
        ax.axhline(1.0 / report.experts, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for j in range(len(layers), rows * columns):
        axes[j // columns][j % columns].axis("off")
    axes[0][0].set_ylabel("share of routed choices", fontsize=8)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    fig.suptitle(f"{report.model}: expert share per layer ({report.experts} experts, top-{report.top_k})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.96))
    return fig


def repetition_figure(report: RoutingReport) -> Figure:
    """Two panels (same_top1, shared_any): a line per domain over the MoE layers, then the baseline."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    baseline = report.random_baseline
    for ax, field, title, chance in (
        (axes[0][0], "same_top1", "same first-choice expert", baseline.same_top1),
        (axes[0][1], "shared_any", "any chosen expert shared", baseline.shared_any),
    ):
        for name, domain in report.domains.items():
            points = [(entry.layer, getattr(entry, field)) for entry in domain.layers if getattr(entry, field) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
        ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"random ({chance:.1%})")
        ax.set_title(f"consecutive tokens: {title}", fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("rate")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.model}: routing repetition ({report.experts} experts, top-{report.top_k})", fontsize=10)
    fig.tight_layout()
    return fig
