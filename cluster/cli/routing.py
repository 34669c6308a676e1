"""``moeshard routing``: which experts each input text's tokens use, and how often consecutive tokens keep them."""

from __future__ import annotations

import argparse

from moeshard.cluster.choices import DTYPE_NAMES


def add_routing_command(commands) -> None:
    routing = commands.add_parser(
        "routing",
        help="routing analysis of texts (expert shares, repetition rates)",
        description="Tokenize each input text (a domain, named by its file's stem), run it through the model as a "
        "prefill and write DIR/routing.json (per domain and MoE layer: each expert's share of routed choices, "
        "same_top1 and shared_any of consecutive tokens, beside the random baselines), expert_share.png, "
        "repetition.png and tokens.html (the texts coloured by first-choice expert). Prints a summary table.",
    )
    routing.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (safetensors) with its tokenizer")
    routing.add_argument("--input", action="append", required=True, metavar="FILE", help="a text file per domain (repeatable)")
    routing.add_argument("--out", required=True, metavar="DIR", help="where to write the report (created if missing)")
    routing.add_argument("--expert-actors", type=int, default=0, help="expert actors on Ray (0: one process; the same numbers)")
    routing.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    routing.set_defaults(run=run_routing)


def run_routing(args: argparse.Namespace) -> None:
    from moeshard.cluster.analysis.run import analyze_routing, format_table, read_domains

    if args.expert_actors < 0:
        raise ValueError("--expert-actors must be 0 or more")
    domains = read_domains(args.input)
    analysis = analyze_routing(args.model_dir, domains, args.out, expert_actors=args.expert_actors, dtype=args.dtype)
    print(format_table(analysis.report))
    for path in analysis.files:
        print(path)
