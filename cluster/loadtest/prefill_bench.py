"""Prefill and decode in one process against ``transformers``: ``python -m moeshard.cluster.loadtest.prefill_bench``.

1. Write a synthetic Mixtral (random weights; ``SIZES``: hidden 512, 8 layers, 8 experts top-2, expert
   hidden 1024, 8 query / 4 KV heads, float32) to a temp dir.
2. Load it twice in this process: ``MixtralForCausalLM`` (its defaults: SDPA attention, ``grouped_mm``
   experts) and ``LLM`` (experts in this process; one engine per ``--max-batch-tokens``, i.e. prefill in
   chunks of that many tokens).
3. Prefill of one prompt of each ``--lengths``: transformers' forward with ``logits_to_keep=1`` (as its
   ``generate`` does) against ``LLM.generate(max_tokens=1)``, which computes the last row's logits too.
   The systems take turns, ``--repeats`` times; the median is kept.
4. Decode of ``--decode-seqs`` sequences of ``--decode-prompt-len`` prompt tokens at once: the time of
   ``N + 1`` new tokens minus that of 1 (the prefill) run right after, per decoded token; transformers'
   batched ``generate`` against ``LLM.generate`` (greedy, ``ignore_eos``).

``--device cuda --dtype bfloat16`` runs both on a GPU (the weights cast on load; timings end with a device
synchronisation). One run, every system on the same machine at the same time: read the ratios, not the
absolute speeds.
On a machine whose cores other work also uses, ``--threads 1`` keeps torch's threads from waiting on
each other (an OpenMP thread descheduled mid-op stalls every op: decode ran 30x slower here so).

Dimensions: B sequences, n prompt tokens.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

logger = logging.getLogger(__name__)

SIZES = dict(
    hidden_size=512, intermediate_size=1024, num_layers=8, num_experts=8, experts_per_token=2,
    num_heads=8, num_kv_heads=4, vocab_size=32000,
)  # fmt: skip


class Row(BaseModel):
    """Tokens per second of each system on one workload (median of the repeats)."""

    workload: str
    tokens: int  # tokens processed per timed run (prompt tokens, or decoded tokens)
    tokens_per_s: dict[str, float]  # system -> tokens/s


class BenchResult(BaseModel):
    torch_version: str
    threads: int
    device: str = "cpu"
    dtype: str = "float32"
    systems: list[str]  # the first is the baseline
    rows: list[Row]


# Run by runpy beside another __main__ (python -m cProfile -m ...), pydantic would look up the postponed
# annotations there: resolve them here, in this module's namespace.
BenchResult.model_rebuild()


def median_seconds(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each system runs once per round, in turn (a warm-up round first); the median of the seconds each run reports."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            seconds = run()
            if round_ > 0:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Seconds ``fn`` takes, up to the end of the work it queued on ``device``."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


class Systems:
    """transformers and one moeshard engine per chunk size, on one checkpoint."""

    def __init__(self, model_dir: Path, chunk_sizes: list[int], kv_cache_bytes: int, device: str = "cpu", dtype: str = "float32"):
        from transformers import MixtralForCausalLM

        from moeshard.cluster.engine.llm import LLM

        self.device = torch.device(device)
        self.hf = MixtralForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        # Without the prefix cache: every round prefills the same prompt, which the cache would serve from
        # its first round on (transformers keeps nothing between calls).
        self.llms = {
            f"moeshard (chunks of {size})": LLM(
                model_dir, dtype=dtype, device=device, max_batch_tokens=size, kv_cache_bytes=kv_cache_bytes,
                enable_prefix_caching=False,
            )
            for size in chunk_sizes
        }

    @property
    def names(self) -> list[str]:
        return ["transformers", *self.llms]

    def prefill_runs(self, ids: list[int]) -> dict[str, Callable[[], float]]:
        from moeshard.cluster.engine.sampling import SamplingParams

        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        runs = {"transformers": lambda: timed(lambda: self._hf_forward(ids), self.device)}
        for name, llm in self.llms.items():
            runs[name] = lambda llm=llm: timed(lambda: llm.generate([ids], one))
        return runs

    def decode_runs(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Callable[[], float]]:
        """Seconds of ``new_tokens`` decode steps: ``new_tokens + 1`` new tokens minus 1 (the prefill), back to back."""
        from moeshard.cluster.engine.sampling import SamplingParams

        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

        runs = {
            "transformers": lambda: timed(lambda: self._hf_generate(prompts, new_tokens + 1), self.device)
            - timed(lambda: self._hf_generate(prompts, 1), self.device)
        }
        for name, llm in self.llms.items():
            runs[name] = lambda llm=llm: timed(lambda: llm.generate(prompts, params(new_tokens + 1))) - timed(
                lambda: llm.generate(prompts, params(1))
            )
        return runs

    @torch.inference_mode()
    def _hf_forward(self, ids: list[int]) -> None:
        self.hf(torch.tensor([ids], device=self.device), logits_to_keep=1)

    @torch.inference_mode()
    def _hf_generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        input_ids = torch.tensor(prompts, device=self.device)  # [B, n], equal lengths: no padding
        out = self.hf.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        assert out.shape[1] == input_ids.shape[1] + new_tokens

    def close(self) -> None:
        for llm in self.llms.values():
            llm.close()


def run(args: argparse.Namespace, model_dir: Path) -> BenchResult:
    systems = Systems(model_dir, args.max_batch_tokens, args.kv_cache_mb * 2**20, args.device, args.dtype)
    rows = []
    try:
        for length in args.lengths:
            seconds = median_seconds(systems.prefill_runs(prompt_ids(length, SIZES["vocab_size"], length)), args.repeats)
            rows.append(Row(workload=f"prefill {length}", tokens=length, tokens_per_s={k: length / s for k, s in seconds.items()}))
            logger.info("prefill %d: %s", length, rows[-1].tokens_per_s)
        prompts = [prompt_ids(args.decode_prompt_len, SIZES["vocab_size"], 1000 + b) for b in range(args.decode_seqs)]
        seconds = median_seconds(systems.decode_runs(prompts, args.decode_tokens), args.repeats)
        decoded = args.decode_seqs * args.decode_tokens
        rows.append(
            Row(
                workload=f"decode {args.decode_seqs} x {args.decode_tokens} (prompts of {args.decode_prompt_len})",
                tokens=decoded,
                tokens_per_s={k: decoded / s for k, s in seconds.items()},
            )
        )
    finally:
        systems.close()
    return BenchResult(
        torch_version=torch.__version__, threads=torch.get_num_threads(), device=args.device, dtype=args.dtype,
        systems=systems.names, rows=rows,
    )


def format_result(result: BenchResult) -> str:
    base, others = result.systems[0], result.systems[1:]
    header = f"| workload | {base} tok/s | " + " | ".join(f"{name} tok/s | vs {base}" for name in others) + " |"
    lines = [header, "|---|---:|" + "---:|---:|" * len(others)]
    for row in result.rows:
        cells = [f"{row.tokens_per_s[base]:.0f}"]
        for name in others:
            cells += [f"{row.tokens_per_s[name]:.0f}", f"{row.tokens_per_s[name] / row.tokens_per_s[base]:.2f}x"]
        lines.append(f"| {row.workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moeshard.cluster.loadtest.prefill_bench",
        description="Prefill and decode of moeshard in one process against transformers, on a synthetic Mixtral.",
    )
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--lengths", type=ints, default=[512, 2048, 4096], help="prompt lengths, '' for none (default: 512,2048,4096)")
    parser.add_argument("--max-batch-tokens", type=ints, default=[2048, 4096], help="moeshard's chunk sizes (default: 2048,4096)")
    parser.add_argument("--decode-seqs", type=int, default=32, help="sequences decoding at once (default: 32)")
    parser.add_argument("--decode-prompt-len", type=int, default=128, help="their prompt tokens (default: 128)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens each decodes (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up round (default: 3)")
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="each engine's KV cache (default: 1024)")
    parser.add_argument("--device", default="cpu", help="where both systems run: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="both systems' weights (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="moeshard-prefill") as tmp:
        positions = max([*args.lengths, args.decode_prompt_len + args.decode_tokens]) + 1
        model_dir = write_synthetic_mixtral(Path(tmp) / "mixtral", max_position_embeddings=positions, dtype=torch.float32, **SIZES)
        result = run(args, model_dir)
    print(f"torch {result.torch_version}, {result.device}, {result.dtype}, {result.threads} threads; median of {args.repeats} rounds")
    print(format_result(result))
    if args.json is not None:
        Path(args.json).write_text(result.model_dump_json(indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
