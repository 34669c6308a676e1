"""Serving benchmark: the load generator against a live server at several concurrencies, then ``transformers``.

    python -m moeshard.cluster.loadtest.serving_bench [--model-dir DIR] [--expert-actors 2] [--concurrency 1,4,16,64]

1. Take ``--model-dir``, or write a small synthetic Mixtral (random weights, the real Mixtral tokenizer) to a
   temp dir.
2. Run ``MixtralForCausalLM.generate`` on it, one request at a time (greedy, exactly ``--output-len`` new
   tokens), on the prompts the concurrency-1 level will send.
3. Start Ray and Serve with ``build_app`` (experts on ``--expert-actors`` actors), warm it up, and run
   ``loadgen.run_load`` at each concurrency: output tokens/s, TTFT and TPOT p50/p99, and the throughput over
   transformers' as a ratio.

Numbers on a machine shared by the server, its actors and this load generator are ratios of one run, not
absolute speeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from moeshard.cluster.client.async_client import AsyncClient
from moeshard.cluster.loadtest.loadgen import LoadReport, LoadSpec, run_load, synthetic_prompt
from moeshard.cluster.loadtest.progress import Progress
from moeshard.cluster.loadtest.table import ms

logger = logging.getLogger(__name__)

MODEL_NAME = "bench"
SYNTHETIC = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)


class BaselineResult(BaseModel):
    requests: int
    output_tokens: int
    duration_s: float

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s


class ServeBenchResult(BaseModel):
    model_dir: str
    expert_actors: int
    reports: list[LoadReport]
    baseline: BaselineResult


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
ServeBenchResult.model_rebuild()


def write_synthetic_mixtral(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random Mixtral (``SYNTHETIC`` sizes, or ``overrides``) with the real Mixtral SentencePiece tokenizer (from mistral-common)."""
    import importlib.resources

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    try:
        tokenizer = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the synthetic model takes its tokenizer from mistral-common: install it, or pass --model-dir") from None
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**SYNTHETIC, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)  # large enough that greedy choices are clear-cut
    model.save_pretrained(out_dir)
    shutil.copy(tokenizer, out_dir / "tokenizer.model")
    return out_dir


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model-dir`` and ``--expert-actors``, as every serving benchmark takes them."""
    parser.add_argument("--model-dir", default=None, help="a Mixtral checkpoint with a tokenizer (default: a small synthetic one)")
    parser.add_argument("--expert-actors", type=int, default=2, help="expert actors (default: 2)")


def check_model_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        parser.error(f"model directory {args.model_dir!r} does not exist")


@contextlib.contextmanager
def benchmark_model(model_dir: str | None, **overrides) -> Iterator[Path]:
    """``model_dir``, or a synthetic Mixtral (``SYNTHETIC`` with ``overrides``) in a temporary directory meanwhile."""
    if model_dir is not None:
        yield Path(model_dir)
        return
    with tempfile.TemporaryDirectory(prefix="moeshard-bench") as tmp:
        yield write_synthetic_mixtral(Path(tmp) / "synthetic-mixtral", **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_at(concurrency: int, scale: float) -> int:
    """Requests to send at a concurrency: four waves, at least 16 (times ``scale``)."""
    return max(1, round(scale * max(16, 4 * concurrency)))


def add_level_arguments(parser: argparse.ArgumentParser, concurrency: str, output_len: int) -> None:
    """--concurrency, --scale, --prompt-len and --output-len: the load levels (``parse_levels`` reads them)."""
    parser.add_argument("--concurrency", default=concurrency, help=f"comma-separated concurrencies (default: {concurrency})")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the requests per level, max(16, 4 x concurrency)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, about (default: 32)")
    parser.add_argument("--output-len", type=int, default=output_len, help=f"output tokens per request (default: {output_len})")


def parse_levels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--concurrency as a list of positive integers, or a usage error."""
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be >= 1")


async def run_levels(client: AsyncClient, model: str | None, args: argparse.Namespace) -> list[LoadReport]:
    """One closed-loop load per ``args.concurrency``, each with its own prompts (seeded by the concurrency)."""
    reports = []
    for concurrency in args.concurrency:
        spec = LoadSpec(
            requests=requests_at(concurrency, args.scale),
            concurrency=concurrency,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            seed=concurrency,
        )
        progress = Progress(spec.requests, f"concurrency {concurrency:>3}")
        reports.append(await run_load(client, spec, model, on_done=lambda r: progress.advance(r.ok)))
        progress.close()
    return reports


async def _load_levels(url: str, args: argparse.Namespace) -> list[LoadReport]:
    async with AsyncClient(url, model=MODEL_NAME, timeout=600, max_retries=0) as client:
        await run_load(client, LoadSpec(requests=2, concurrency=1, prompt_len=args.prompt_len, output_len=4))  # warm-up
        return await run_levels(client, None, args)


@contextlib.contextmanager
def served_model(
    model_dir: Path, expert_actors: int, engine: dict | None = None, coordinators: int = 1, extra_cpus: int = 0
) -> Iterator[str]:
    """Ray, Serve and the app for ``model_dir`` on a free 127.0.0.1 port; yields its URL, shuts everything down after.
    ``extra_cpus``: room in Ray for that many more expert actors (a scaling benchmark)."""
    import ray
    from ray import serve

    from moeshard.actors.ray_init import init_ray
    from moeshard.deploy.app import build_app

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray"))
    port = free_port()
    init_ray(num_cpus=expert_actors + coordinators + 1 + extra_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        app = {
            "model_dir": str(model_dir), "model_name": MODEL_NAME, "expert_actors": expert_actors,
            "coordinators": coordinators, "max_waiting": 4096,
        }  # fmt: skip
        serve.run(build_app({**app, "engine": engine or {}}), name="bench", route_prefix="/", logging_config=quiet)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def run_server_levels(model_dir: Path, args: argparse.Namespace) -> list[LoadReport]:
    with served_model(model_dir, args.expert_actors) as url:
        return asyncio.run(_load_levels(url, args))


def run_transformers(model_dir: Path, args: argparse.Namespace) -> BaselineResult:
    """``generate`` on the prompts of the concurrency-1 level, one at a time, greedy, exactly ``output_len`` new tokens."""
    import torch
    from transformers import MixtralForCausalLM

    from moeshard.cluster.engine.assembly import maybe_tokenizer

    tokenizer = maybe_tokenizer(model_dir)
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = [tokenizer.encode(synthetic_prompt(rng, args.prompt_len)) for _ in range(args.baseline_requests)]

    def generate(ids: list[int], new_tokens: int) -> int:
        input_ids = torch.tensor([ids])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out.shape[1] - len(ids)

    with torch.inference_mode():
        generate(prompts[0], 4)  # warm-up
        progress = Progress(len(prompts), "transformers   ")
        started, tokens = time.perf_counter(), 0
        for ids in prompts:
            tokens += generate(ids, args.output_len)
            progress.advance()
        duration = time.perf_counter() - started
        progress.close()
    return BaselineResult(requests=len(prompts), output_tokens=tokens, duration_s=duration)


def format_result(result: ServeBenchResult) -> str:
    base = result.baseline.output_throughput
    lines = [
        "| concurrency | requests | output tok/s | vs transformers | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.reports:
        lines.append(
            f"| {r.spec.concurrency} | {r.completed} | {r.output_throughput:.1f} | {r.output_throughput / base:.2f}x | "
            f"{ms(r.ttft_p50_s)} | {ms(r.ttft_p99_s)} | {ms(r.tpot_p50_s)} | {ms(r.tpot_p99_s)} |"
        )
    lines.append(f"| transformers, one at a time | {result.baseline.requests} | {base:.1f} | 1.00x | | | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.cluster.loadtest.serving_bench",
        description="Serve a model with experts on Ray actors, load it at several concurrencies, compare with transformers.",
    )
    add_model_arguments(parser)
    add_level_arguments(parser, concurrency="1,4,16,64", output_len=32)
    parser.add_argument("--baseline-requests", type=int, default=16, help="requests transformers runs (default: 16)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    parse_levels(parser, args)
    check_model_dir(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    with benchmark_model(args.model_dir) as model_dir:
        baseline = run_transformers(model_dir, args)  # first, on a quiet machine (Ray's processes take a while to go)
        reports = run_server_levels(model_dir, args)
    result = ServeBenchResult(model_dir=str(args.model_dir or "synthetic"), expert_actors=args.expert_actors, reports=reports, baseline=baseline)
    print(format_result(result))
    if args.json is not None:
        Path(args.json).write_text(result.model_dump_json(indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
