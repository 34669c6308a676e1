"""Decode throughput in one process with and without the decode mirror (not a test).

    python -m moeshard.cluster.loadtest.decode_mirror_bench [--sequences N,...] [--prompt-len N,...]
                                                            [--tokens 32] [--repeats 3] [--dtype float32]
                                                            [--mirror-min-keys 4096]
    (defaults: --sequences 32,64 --prompt-len 128,1024)

Two engines on prefill_bench's synthetic Mixtral (8 layers, hidden 512, 8 experts top-2, 8 heads on 4 kv heads),
the experts in process: one with the decode mirror (the default, kernels/decode_mirror.py), one with
``decode_mirror_bytes=0`` (the decode group gathers every history each layer). The mirror's engine gathers
too where a step's group has fewer than ``--mirror-min-keys`` keys (``decode_mirror_min_keys``). For each number of sequences
and prompt length, both decode the same greedy sequences of ``--tokens`` tokens each, taking turns
``--repeats`` times, their prompts already in the prefix cache (a first untimed call computes them): the table
gives the median output tokens/s, all but the first of each sequence from decode steps, and checks both give the
same tokens. One run, one machine: read the ratios.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.loadtest.prefill_bench import SIZES, prompt_ids


class DecodeRun(NamedTuple):
    tokens_per_s: float
    token_ids: list[list[int]]  # each prompt's output tokens


def decode_rate(llm: LLM, prompts: list[list[int]], tokens: int) -> DecodeRun:
    """Decoding ``prompts`` whose blocks the prefix cache already holds: the step that computes each prompt's
    last token, then ``tokens - 1`` decode steps."""
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return DecodeRun(len(prompts) * tokens / (time.perf_counter() - started), [o.token_ids for o in outputs])


def main(argv: list[str] | None = None) -> int:
    from moeshard.cluster.convert.synthetic_model import write_synthetic_mixtral

    parser = argparse.ArgumentParser(prog="python -m moeshard.cluster.loadtest.decode_mirror_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", default="32,64", help="comma-separated (default: 32,64)")
    parser.add_argument("--prompt-len", default="128,1024", help="comma-separated prompt tokens (default: 128,1024)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each sequence decodes (default: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mirror-min-keys", type=int, default=4096, help="the mirror engine's decode_mirror_min_keys")
    args = parser.parse_args(argv)
    sequences = [int(v) for v in args.sequences.split(",")]
    prompt_lens = [int(v) for v in args.prompt_len.split(",")]
    logging.basicConfig(level="WARNING")
    kv_bytes = 2 * 2**30  # room for 64 sequences of 1024 + 32 tokens (1 GiB at float32), the mirror as much
    with tempfile.TemporaryDirectory(prefix="moeshard-mirror-bench") as tmp:
        positions = max(prompt_lens) + args.tokens + 1
        model_dir = write_synthetic_mixtral(Path(tmp) / "mixtral", max_position_embeddings=positions, dtype=torch.float32, **SIZES)
        common = dict(dtype=args.dtype, kv_cache_bytes=kv_bytes)
        mirror_min_keys = dict(decode_mirror_min_keys=args.mirror_min_keys)
        with LLM(model_dir, **common, **mirror_min_keys) as mirrored, LLM(model_dir, decode_mirror_bytes=0, **common) as gathered:
            engines = {"mirror": mirrored, "gather": gathered}
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.tokens} tokens each\n")
            print("| sequences | prompt tokens | gathers (tok/s) | mirror (tok/s) | mirror vs gathers | same tokens |")
            print("|---:|---:|---:|---:|---:|---|")
            for n in sequences:
                for length in prompt_lens:
                    prompts = [prompt_ids(length, SIZES["vocab_size"], seed=s) for s in range(n)]
                    rates: dict[str, list[float]] = {name: [] for name in engines}
                    tokens: dict[str, list[list[int]]] = {}
                    for llm in engines.values():  # the prompts into the prefix cache
                        llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
                    for _ in range(args.repeats):
                        for name, llm in engines.items():
                            run = decode_rate(llm, prompts, args.tokens)
                            rates[name].append(run.tokens_per_s)
                            tokens[name] = run.token_ids
                    gather, mirror = (statistics.median(rates[name]) for name in ("gather", "mirror"))
                    same = tokens["gather"] == tokens["mirror"]
                    print(f"| {n} | {length} | {gather:.1f} | {mirror:.1f} | {mirror / gather:.2f}x | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
