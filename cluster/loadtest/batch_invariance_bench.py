"""What ``batch_invariant=True`` costs: decode steps and a prefill, with and without it, in one process.

    python -m moeshard.cluster.loadtest.batch_invariance_bench MODEL_DIR [--dtype bfloat16] [--sequences 1,16,64]
        [--prompt-len 1024] [--rounds 3]

Two engines on the same checkpoint, the experts in process, without prefix caching (every prefill in full),
taking turns for ``--rounds`` rounds of each case after one to warm up (median):

- **decode, n sequences**: n prompts of 32 tokens, greedy with ``ignore_eos``: the time of 34 new tokens minus
  that of 2, over 32 steps;
- **prefill**: one prompt of ``--prompt-len`` tokens, one new token.

It also says whether each engine gave every sequence of the largest decode the same tokens and logprobs as
that prompt alone (the mode's promise; the other engine's are whatever its batches make them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.choices import DTYPE_CHOICES
from moeshard.cluster.loadtest.prefill_bench import median_seconds, prompt_ids, timed
from moeshard.cluster.loadtest.table import ms

DECODE_TOKENS = 32


def decode_step_s(llm: LLM, prompts: list[list[int]]) -> float:
    def tokens(n: int) -> Callable[[], object]:
        return lambda: llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    return (timed(tokens(DECODE_TOKENS + 2)) - timed(tokens(2))) / DECODE_TOKENS


def prefill_s(llm: LLM, prompt: list[int]) -> float:
    return timed(lambda: llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0)))


def same_alone_and_together(llm: LLM, prompts: list[list[int]]) -> bool:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    return all(a.token_ids == b.token_ids and a.logprobs == b.logprobs for a, b in zip(together, alone))


def run(model_dir: str, dtype: str, sequences: list[int], prompt_len: int, rounds: int) -> list[str]:
    """The report's markdown lines."""
    engines = {
        name: LLM(model_dir, dtype=dtype, batch_invariant=on, enable_prefix_caching=False)  # each prefill in full
        for name, on in (("default", False), ("batch invariant", True))
    }
    try:
        vocab = next(iter(engines.values())).model_config.vocab_size
        decode_prompts = {n: [[1, *prompt_ids(31, vocab, seed=1000 * n + i)] for i in range(n)] for n in sequences}
        long_prompt = [1, *prompt_ids(prompt_len - 1, vocab, seed=0)]
        cases: dict[str, Callable[[LLM], float]] = {f"decode, {n} sequences (ms a step)": (lambda llm, n=n: decode_step_s(llm, decode_prompts[n])) for n in sequences}  # fmt: skip
        cases[f"prefill, {prompt_len} tokens (ms)"] = lambda llm: prefill_s(llm, long_prompt)
        lines = ["| case | default | batch invariant | cost |", "|---|---:|---:|---:|"]
        for case, measure in cases.items():
            plain, invariant = median_seconds({name: lambda llm=llm: measure(llm) for name, llm in engines.items()}, rounds).values()
            lines.append(f"| {case} | {ms(plain, 1)} | {ms(invariant, 1)} | {invariant / plain:.2f}x |")
        largest = decode_prompts[max(sequences)][:8]
        lines.append("")
        for name, llm in engines.items():
            lines.append(f"{name}: each of {len(largest)} sequences the same alone as together: {same_alone_and_together(llm, largest)}")
        return lines
    finally:
        for llm in engines.values():
            llm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--sequences", default="1,16,64", help="comma-separated decode batch sizes (default: 1,16,64)")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prefill prompt tokens (default: 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round (default: 3)")
    args = parser.parse_args(argv)
    sequences = [int(n) for n in args.sequences.split(",")]
    print("\n".join(run(args.model_dir, args.dtype, sequences, args.prompt_len, args.rounds)))


if __name__ == "__main__":
    main()
