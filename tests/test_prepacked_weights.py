"""Weights prepacked for oneDNN on CPU (kernels/linear.py): the same numbers as transformers, and the actor's
stacks built from packed experts share them.

The checkpoints here are larger than the other tests' (hidden 256): below ``PACK_MIN_WEIGHT`` elements a
weight stays plain, so the tiny models never take the packed path. Their k/v projections (128 x 256) stay
plain while q/o, the experts and the LM head are packed: both kinds of weight in one model.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from moeshard.actors.expert_actor import ExpertActor
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.moe import ExpertStack, held_bytes, load_expert_stacks
from moeshard.kernels.linear import PACKED_DTYPES, PREPACK_ENV_VAR, prepacks

pytestmark = pytest.mark.skipif(not prepacks(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN linear")
needs_packed_bfloat16 = pytest.mark.skipif(
    torch.bfloat16 not in PACKED_DTYPES, reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
)

MIXTRAL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
QWEN2 = dict(
    hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=512, intermediate_size=512,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, num_experts=8, num_experts_per_tok=2,
    mlp_only_layers=[1], tie_word_embeddings=True,
)  # fmt: skip
PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1]]


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("prepacked_mixtral", seed=3, **MIXTRAL)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_family_factory):
    return tiny_family_factory("prepacked_qwen2", "Qwen2MoeForCausalLM", seed=4, **QWEN2)


def _reference(path, architecture: str, dtype: torch.dtype = torch.float32):
    model_cls = getattr(transformers, architecture)
    return model_cls.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


@pytest.mark.parametrize("family", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_packed_model_matches_transformers(family, mixtral_dir, qwen2_dir):
    path = mixtral_dir if family == "MixtralForCausalLM" else qwen2_dir
    reference = _reference(path, family)
    with LLM(path) as llm:
        model = llm._engine.model
        first, stacks = model.weights.layers[0], model.experts.stacks
        assert first.qkv_proj.is_mkldnn and first.o_proj.is_mkldnn and model.weights.lm_head.is_mkldnn
        assert not first.router.is_mkldnn and not model.weights.embed.is_mkldnn  # small; indexed
        assert all(stack.packed for stack in stacks.values())
        if family == "Qwen2MoeForCausalLM":  # the shared expert (layer 0) and the dense MLP (layer 1)
            assert first.shared_expert.w2.is_mkldnn and model.weights.layers[1].mlp.w1.is_mkldnn
        for prompt in PROMPTS:
            ours = llm.logits(prompt)
            with torch.no_grad():
                theirs = reference(torch.tensor([prompt])).logits[0].float()
            assert (ours - theirs).abs().max().item() < 1e-4
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0))
    eos = reference.config.eos_token_id
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        expected = expected[0, len(prompt) :].tolist()
        assert out.token_ids == (expected[: expected.index(eos) + 1] if eos in expected else expected)


def test_prepack_can_be_turned_off_and_gives_the_same_tokens(mixtral_dir, monkeypatch):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(mixtral_dir) as llm:
        packed = [o.token_ids for o in llm.generate(PROMPTS, params)]
    monkeypatch.setenv(PREPACK_ENV_VAR, "0")
    with LLM(mixtral_dir) as llm:
        model = llm._engine.model
        assert not model.weights.layers[0].qkv_proj.is_mkldnn and not model.experts.stacks[0].packed
        plain = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert packed == plain


@needs_packed_bfloat16
def test_bfloat16_packed_model_equals_the_plain_one_and_stays_close_to_transformers(mixtral_dir, monkeypatch):
    """In bfloat16, oneDNN's linear on a packed weight rounds as F.linear does: the same logits as with plain
    weights, bit for bit, and as close to transformers in bfloat16 as bfloat16 allows."""
    reference = _reference(mixtral_dir, "MixtralForCausalLM", torch.bfloat16)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(mixtral_dir, dtype="bfloat16") as llm:
        model = llm._engine.model
        assert model.weights.layers[0].qkv_proj.is_mkldnn and model.weights.layers[0].qkv_proj.dtype == torch.bfloat16
        assert all(stack.packed and stack.w1[0].dtype == torch.bfloat16 for stack in model.experts.stacks.values())
        packed_logits = [llm.logits(prompt) for prompt in PROMPTS]
        packed_tokens = [o.token_ids for o in llm.generate(PROMPTS, params)]
    monkeypatch.setenv(PREPACK_ENV_VAR, "0")
    with LLM(mixtral_dir, dtype="bfloat16") as llm:
        assert not llm._engine.model.experts.stacks[0].packed
        plain_logits = [llm.logits(prompt) for prompt in PROMPTS]
        plain_tokens = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert packed_tokens == plain_tokens
    for prompt, ours, plain in zip(PROMPTS, packed_logits, plain_logits):
        assert torch.equal(ours, plain)
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt])).logits[0].float()
        assert (ours - theirs).abs().max().item() < 0.02 * theirs.abs().max().item()  # a few bfloat16 roundings


def _plain_stacks(path, monkeypatch, dtype: torch.dtype = torch.float32) -> dict[int, ExpertStack]:
    with monkeypatch.context() as m:
        m.setenv(PREPACK_ENV_VAR, "0")
        config = ModelConfig.from_model_dir(path)
        return load_expert_stacks(CheckpointReader(path, config), {0: range(8)}, dtype)


@pytest.mark.parametrize("tokens", [1, 2, 9, 40])  # one token alone, and grouped rows
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_packed_bfloat16)])
def test_packed_stack_equals_the_stacked_one(mixtral_dir, monkeypatch, tokens, dtype):
    config = ModelConfig.from_model_dir(mixtral_dir)
    packed = load_expert_stacks(CheckpointReader(mixtral_dir, config), {0: range(8)}, dtype)[0]
    plain = _plain_stacks(mixtral_dir, monkeypatch, dtype)[0]
    expected_bytes = 8 * 3 * 512 * 256 * dtype.itemsize
    assert packed.packed and not plain.packed and packed.nbytes() == plain.nbytes() == expected_bytes
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 256, generator=generator).to(dtype)  # [T, D]
    local_ids = torch.stack([torch.randperm(9, generator=generator)[:2] - 1 for _ in range(tokens)])  # [T, K]; -1: not here
    weights = torch.rand(tokens, 2, generator=generator)
    got, expected = packed.run(hidden, local_ids, weights), plain.run(hidden, local_ids, weights)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # bfloat16: oneDNN's linear either way, so the same roundings
        assert torch.equal(got, expected)


def test_experts_too_small_to_pack_stay_stacked(tiny_mixtral_dir):
    """Experts of 50 x 64 stay one stacked tensor per matrix: their own small tensors would sit wherever
    the checkpoint file put them, and the BLAS's rounding can follow the alignment."""
    config = ModelConfig.from_model_dir(tiny_mixtral_dir)
    stack = load_expert_stacks(CheckpointReader(tiny_mixtral_dir, config), {0: range(8)}, torch.float32)[0]
    assert not stack.packed and stack.w1.shape == (8, 50, 64)


def test_actor_restacks_packed_experts_without_copies(mixtral_dir, monkeypatch):
    actor = ExpertActor(0, str(mixtral_dir), "float32", {0: [0, 1], 1: [0, 1]})
    expert_bytes = 3 * 512 * 256 * 4
    report = actor.stage(1, {0: [1, 5], 1: [0, 1]})
    assert report["bytes_loaded"] == expert_bytes  # expert 5 only
    old, new = actor.versions[0][0], actor.versions[1][0]
    assert new.packed and new.w1[0] is old.w1[1] and new.w2[0] is old.w2[1]  # expert 1: the same tensors
    assert report["weight_bytes"] == held_bytes([old, new, actor.versions[1][1]]) == 5 * expert_bytes  # 0, 1, 5 + layer 1

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 256, generator=generator)  # [T, D]
    local = torch.tensor([[0, 1], [1, -1], [0, 0], [-1, 1], [1, 0], [0, -1]], dtype=torch.int32)  # [T, K] into [1, 5]
    weights = torch.rand(6, 2, generator=generator)
    reply = ExpertReply.decode(actor.run_experts(ExpertBatch(0, 3, hidden, local, weights, 1).encode()))
    plain = _plain_stacks(mixtral_dir, monkeypatch)[0]
    expected = plain.run(hidden, torch.where(local >= 0, local * 4 + 1, -1).long(), weights)  # local 0 -> 1, 1 -> 5
    torch.testing.assert_close(reply.rows, expected, rtol=1e-5, atol=1e-5)
    assert actor.retire(1) == 4 * expert_bytes  # layer 0: experts 1 and 5; layer 1: 0 and 1
