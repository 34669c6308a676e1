"""``batch_invariant=True``: a request's tokens and logprobs are the same bit for bit alone, in a batch with
others, with its prompt cut into other prefill chunks, and from the prefix cache (kernels/batch_invariance.py),
in process and over expert actors; its logits stay those of transformers' Mixtral on the same checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine.config import EngineConfig
from moeshard.kernels.batch_invariance import ROW_TILE, batch_invariant, batch_invariant_now
from moeshard.kernels.linear import linear, linear_into, prepack
from moeshard.kernels.paged_attention import attention_by_products

MIXTRAL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1], list(range(1, 60))]
PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("invariant_mixtral", seed=11, **MIXTRAL)


def _outputs(outputs) -> list[tuple]:
    """Each output's tokens and logprobs (top-3 with the chosen), exactly as floats."""
    return [(o.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs]) for o in outputs]


def _every_way(llm: LLM) -> dict[str, list[tuple]]:
    """PROMPTS generated together, each alone, and together in reverse order (the prompts' blocks now cached)."""
    together = _outputs(llm.generate(PROMPTS, PARAMS))
    alone = [_outputs(llm.generate([p], PARAMS))[0] for p in PROMPTS]
    reversed_ = _outputs(llm.generate(PROMPTS[::-1], PARAMS))[::-1]
    return {"together": together, "alone": alone, "reversed, from the cache": reversed_}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_a_products_row_is_its_own_on_row_tiles(dtype, packed):
    torch.manual_seed(0)
    weight = (torch.randn(1536, 576) * 0.02).to(dtype)  # [O, K]
    weight = prepack(weight) if packed else weight
    x = torch.randn(3 * ROW_TILE + 5, 576).to(dtype)  # [N, K]
    with batch_invariant():
        assert batch_invariant_now()
        whole = linear(x, weight)  # [N, O]
        for start, count in [(0, 1), (3, 2), (5, 7), (0, ROW_TILE), (9, ROW_TILE + 1), (20, 33)]:
            assert torch.equal(linear(x[start : start + count], weight), whole[start : start + count]), (start, count)
            out = torch.empty(count, weight.shape[0], dtype=dtype)
            assert torch.equal(linear_into(x[start : start + count], weight, out), whole[start : start + count])
    assert not batch_invariant_now()
    torch.testing.assert_close(whole, linear(x, weight), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_querys_attention_is_its_own_beside_any_number_of_others(dtype):
    """The products batch-invariant attention runs on: a query's output alone equals its output among g others,
    with keys of their own or one sequence's keys shared (expanded, as a prefill chunk's queries read them), on
    torch's two threads (where CPU SDPA's output moved with g on an AVX2 machine), and with its keys padded by
    masked zeros to any multiple of KEY_MULTIPLE; and it is SDPA's within rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        for width in (16, 48, 80):
            q = torch.randn(32, 4, 1, 64, generator=g).to(dtype)  # [g, H, 1, Dh]
            keys, values = (torch.randn(32, 2, width, 64, generator=g).to(dtype) for _ in range(2))  # [g, Hkv, S, Dh]
            mask = torch.rand(32, 1, 1, width, generator=g) < 0.8  # [g, 1, 1, S]
            mask[..., 0] = True
            shared_keys, shared_values = keys[:1].expand(32, -1, -1, -1), values[:1].expand(32, -1, -1, -1)
            for k, v in ((keys, values), (shared_keys, shared_values)):
                every = attention_by_products(q, k, v, mask, 0.125)  # [32, H, 1, Dh]
                for count in (1, 2, 5, 31):
                    assert torch.equal(attention_by_products(q[:count], k[:count], v[:count], mask[:count], 0.125), every[:count])
            for extra in (16, 64):  # masked zero keys past the last, to another multiple of KEY_MULTIPLE
                padded_keys, padded_values = (torch.cat([x, x.new_zeros(32, 2, extra, 64)], dim=2) for x in (keys, values))
                padded_mask = torch.cat([mask, mask.new_zeros(32, 1, 1, extra)], dim=3)
                padded = attention_by_products(q, padded_keys, padded_values, padded_mask, 0.125)
                assert torch.equal(padded, attention_by_products(q, keys, values, mask, 0.125)), (width, extra)
            sdpa = torch.nn.functional.scaled_dot_product_attention(
                q.float(), keys.float(), values.float(), attn_mask=mask, scale=0.125, enable_gqa=True
            )
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(attention_by_products(q, keys, values, mask, 0.125).float(), sdpa, rtol=tolerance, atol=tolerance)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_batch_tokens", [2048, 16])
def test_outputs_are_the_same_alone_batched_chunked_and_cached(mixtral_dir, dtype, max_batch_tokens):
    """With max_batch_tokens 16 the 59-token prompt is prefilled in chunks that fall elsewhere alone and
    beside the others; the reversed run reads the prompts' blocks from the prefix cache."""
    with LLM(mixtral_dir, dtype=dtype, batch_invariant=True, max_batch_tokens=max_batch_tokens) as llm:
        ways = _every_way(llm)
    for name, outputs in ways.items():
        assert outputs == ways["together"], name


@pytest.mark.parametrize("options", [{"expert_threads": 2}, {"quantization": "experts_int8"}])
def test_expert_threads_and_int8_experts_keep_it(mixtral_dir, options):
    threads = torch.get_num_threads()  # an engine with expert threads sets torch's to 1 for the process
    try:
        with LLM(mixtral_dir, dtype="bfloat16", batch_invariant=True, max_batch_tokens=16, **options) as llm:
            ways = _every_way(llm)
    finally:
        torch.set_num_threads(threads)
    for name, outputs in ways.items():
        assert outputs == ways["together"], name


def test_invariant_logits_are_transformers_logits(mixtral_dir):
    reference = transformers.MixtralForCausalLM.from_pretrained(mixtral_dir, torch_dtype=torch.float32).eval()
    with LLM(mixtral_dir, batch_invariant=True, max_batch_tokens=16) as llm, torch.no_grad():
        for prompt in PROMPTS:
            expected = reference(torch.tensor([prompt])).logits[0]  # [T, V]
            got = llm.logits(prompt)  # [T, V]
            assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()


def test_invariant_cluster_equals_the_single_process(ray_cluster, mixtral_dir):
    with LLM(mixtral_dir, dtype="bfloat16", batch_invariant=True) as llm:
        expected = _every_way(llm)
    cluster = dict(actor_resources=[{"node_a": 1}, {"node_b": 1}], coordinator_resources={"head": 1})
    with LLM(mixtral_dir, dtype="bfloat16", expert_actors=2, batch_invariant=True, cluster=cluster) as llm:
        assert _every_way(llm) == expected


def test_batch_invariant_is_refused_where_it_does_not_hold(mixtral_dir, tiny_checkpoint_factory):
    with pytest.raises(ValueError, match="batch_invariant runs on the CPU"):
        EngineConfig(model_dir=str(mixtral_dir), batch_invariant=True, device="cuda")
    with pytest.raises(ValueError, match="batch_invariant runs on the CPU"):
        EngineConfig(model_dir=str(mixtral_dir), batch_invariant=True, cluster={"expert_actors": 2, "use_gpus": True})
    windowed = tiny_checkpoint_factory("invariant_windowed", seed=3, sliding_window=8)
    with pytest.raises(ValueError, match=r"not with a sliding window \(8\)"):
        LLM(windowed, batch_invariant=True)


def test_the_benchmark_times_both_engines_and_checks_the_promise(mixtral_dir):
    from moeshard.cluster.loadtest.batch_invariance_bench import run

    lines = run(str(mixtral_dir), "bfloat16", [1, 3], prompt_len=40, rounds=1)
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| decode") or line.startswith("| prefill")]
    assert [row[0].strip() for row in rows] == ["decode, 1 sequences (ms a step)", "decode, 3 sequences (ms a step)", "prefill, 40 tokens (ms)"]
    assert all(float(cell) > 0 for row in rows for cell in row[1:3])
    assert "batch invariant: each of 3 sequences the same alone as together: True" in lines
