"""``quantization="experts_int8"``: every expert's weights int8 per output channel, activations int8 per row
(kernels/int8_linear.py). The products are exact integer sums, so a row's output is its own whatever batch it
lands in, and the sharded path equals the single process; against transformers on the same checkpoint with
its expert weights rounded to int8 the same way, the logits agree to the activations' rounding."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import transformers

from moeshard.actors.expert_actor import ExpertActor
from moeshard.actors.pool.expert_pool import actors_use_gpus
from moeshard.actors.wire import ExpertBatch, ExpertReply
from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.checkpoint import CheckpointReader
from moeshard.cluster.model.config import ModelConfig
from moeshard.cluster.model.moe import LocalExperts, held_bytes, load_expert_stacks
from moeshard.kernels import RouterOutput
from moeshard.kernels.int8_linear import (
    Int8Weight,
    dequantize_weight,
    int8_expert_rows,
    int8_linear,
    onednn_int8_available,
    quantize_rows,
    quantize_weight,
)

MIXTRAL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4], [1]]
needs_onednn_int8 = pytest.mark.skipif(
    not onednn_int8_available(), reason="this torch has no oneDNN int8 linear, or it is not exact on this CPU (no VNNI)"
)


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("int8_mixtral", seed=5, **MIXTRAL)


def test_weights_round_to_their_channels_step():
    weight = torch.randn(96, 40) * torch.rand(96, 1)  # channels of different scales
    quantized = quantize_weight(weight, pack=False)
    assert quantized.values.dtype == torch.int8 and quantized.shape == (96, 40)
    assert quantized.values.abs().amax(dim=1).tolist() == [127] * 96  # each channel's largest weight maps to 127
    assert ((dequantize_weight(quantized) - weight).abs() <= quantized.scales[:, None] / 2 + 1e-7).all()
    rows = quantize_rows(torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.bfloat16))
    assert rows.values.tolist() == [[32, -127, 64], [0, 0, 0]]  # 0.5 * 127 / 2 = 31.75; a zero row stays zero
    assert rows.scales[:, 0].tolist() == [pytest.approx(2.0 / 127), pytest.approx(torch.finfo(torch.float32).tiny / 127)]


def test_int8_products_are_exact_on_this_cpu_whichever_path_it_takes():
    """The largest int8 products (every value +-127, where byte-pair sums pass the 16-bit range): the path
    ``quantize_weight`` picks here (oneDNN where its sums are exact, else torch._int_mm) gives the integer sums,
    and the exactness check says whether oneDNN does."""
    from moeshard.kernels import int8_linear as module

    torch.manual_seed(0)
    signs = torch.randint(0, 2, (48, 256)) * 2 - 1  # [O, K]
    weight = signs.float() * 127  # quantizes to exactly +-127 with scale 1
    x = (torch.randint(0, 2, (5, 256)) * 2 - 1).float() * 127  # [N, K], the same
    exact = (x.double() @ weight.double().t()).float()  # integer sums, exact in float32 here (|sum| <= 127^2 * 256)
    assert torch.equal(int8_linear(x, quantize_weight(weight)), exact)
    if module._QPREPACK is not None:
        packed = module.Int8Weight(module._QPREPACK(signs.to(torch.int8) * 127, None), torch.ones(48), torch.zeros(48, dtype=torch.long))
        assert torch.equal(int8_linear(x, packed), exact) == module.onednn_int8_exact()


@needs_onednn_int8
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (100, 37)])
def test_onednn_product_is_the_exact_integer_product(shape):
    """oneDNN on the packed weight and torch._int_mm on the plain one: the same integers, the same floats."""
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    packed, plain = quantize_weight(weight), quantize_weight(weight, pack=False)
    assert packed.packed and not plain.packed and packed.shape == plain.shape == shape
    for n in (1, 3, 64, 65, 200):
        x = torch.randn(n, shape[1])
        assert torch.equal(int8_linear(x, packed), int8_linear(x, plain)), n
        exact = (x @ weight.t()).abs().max()
        assert ((int8_linear(x, plain) - x @ weight.t()).abs().max() / exact).item() < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_output_does_not_depend_on_its_batch(dtype):
    """Each row alone, and in batches of every size (past the padded row counts too), gives the same bits."""
    torch.manual_seed(0)
    w1, w3 = quantize_weight(torch.randn(512, 256) / 16), quantize_weight(torch.randn(512, 256) / 16)
    w2 = quantize_weight(torch.randn(256, 512) / 22)
    x = torch.randn(150, 256).to(dtype)
    x[7] *= 50  # a large row beside the others changes nothing for them
    alone = torch.cat([int8_expert_rows(x[i : i + 1], w1, w3, w2) for i in range(150)])
    assert alone.dtype == dtype
    for n in (2, 17, 64, 65, 100, 150):
        assert torch.equal(int8_expert_rows(x[:n], w1, w3, w2), alone[:n]), n
    out = torch.empty(150, 256, dtype=dtype)
    assert int8_expert_rows(x, w1, w3, w2, out) is out and torch.equal(out, alone)


def _fake_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, K] rounded to int8 per row, as floats: the activations an int8 expert product sees."""
    step = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(x / step) * step


def _int8_reference(path, monkeypatch) -> torch.nn.Module:
    """transformers' Mixtral on the same checkpoint with each expert weight rounded to int8 per output channel (the
    rows of its [E, O, K] tensors) and each expert product's input rounded to int8 per row: experts_int8's
    definition, on transformers' own model and expert loop, in float32."""
    model = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    expert_weights = set()
    with torch.no_grad():
        for layer in model.model.layers:
            for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):  # [E, O, K] each
                weight.copy_(torch.stack([_fake_int8_rows(w) for w in weight]))
                expert_weights.add(id(weight))
    linear = torch.nn.functional.linear

    def expert_aware_linear(x, weight, bias=None):
        if weight._base is not None and id(weight._base) in expert_weights:  # one expert's slice of the [E, O, K] tensor
            x = _fake_int8_rows(x)
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", expert_aware_linear)
    return model


def test_int8_model_matches_transformers_on_int8_weights_and_rows(mixtral_dir, monkeypatch):
    reference = _int8_reference(mixtral_dir, monkeypatch)
    with LLM(mixtral_dir, quantization="experts_int8") as llm, LLM(mixtral_dir) as unquantized:
        stacks = llm._engine.model.experts.stacks
        assert all(isinstance(w, Int8Weight) for stack in stacks.values() for w in stack.matrices())
        expert_bytes = 3 * 512 * 256 + (512 + 512 + 256) * 4  # int8 values and float32 scales
        assert held_bytes(stacks.values()) == 2 * 8 * expert_bytes  # 2 layers of 8 experts: a quarter of float32
        for prompt in PROMPTS:
            ours = llm.logits(prompt)
            with torch.no_grad():
                theirs = reference(torch.tensor([prompt])).logits[0]
            scale = theirs.abs().max().item()
            assert (ours - theirs).abs().max().item() < 1e-5 * scale  # measured: under 1e-6
            assert (unquantized.logits(prompt) - theirs).abs().max().item() > 5e-3 * scale  # the rounding shows
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out.token_ids == expected[0, len(prompt) :].tolist()


def test_int8_cluster_equals_single_process(ray_cluster, mixtral_dir):
    """With the experts on 2 actors each gets other groups of rows than the single process: int8 rows are their own."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(mixtral_dir, quantization="experts_int8") as llm:
        expected_logits = [llm.logits(p) for p in PROMPTS]
        expected_tokens = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    cluster = dict(actor_resources=[{"node_a": 1}, {"node_b": 1}], coordinator_resources={"head": 1})
    with LLM(mixtral_dir, expert_actors=2, quantization="experts_int8", cluster=cluster) as llm:
        for prompt, expected in zip(PROMPTS, expected_logits):
            assert (llm.logits(prompt) - expected).abs().max().item() < 1e-5
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy)] == expected_tokens


@pytest.mark.slow
def test_sigkilled_int8_actor_comes_back_quantized_and_loses_no_request(ray_cluster, mixtral_dir, expert_actor_pid, mid_generation):
    """Ray restarts a killed actor with its constructor's arguments, ``quantization`` among them: the restarted
    process quantizes its experts again, and every token equals the single process's."""
    long = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    with LLM(mixtral_dir, quantization="experts_int8") as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, long)]
    cluster = dict(actor_resources=[{"node_a": 1}, {"node_b": 1}], coordinator_resources={"head": 1}, dispatch_timeout_s=20)
    with LLM(mixtral_dir, expert_actors=2, quantization="experts_int8", cluster=cluster) as llm:
        victim = expert_actor_pid(llm, 1)

        def kill_victim():
            os.kill(victim, signal.SIGKILL)

        tokens = mid_generation.generate_while(llm, PROMPTS, long, lambda: mid_generation.once_decoding(llm, kill_victim))
        assert tokens == expected
        assert sum(llm.expert_health().failures) >= 1 and expert_actor_pid(llm, 1) != victim
        assert [o.token_ids for o in llm.generate(PROMPTS, long)] == expected  # the restarted actor's int8 experts


def test_actor_restages_int8_experts_without_quantizing_again(mixtral_dir):
    actor = ExpertActor(0, str(mixtral_dir), "float32", {0: [0, 1], 1: [0, 1]}, quantization="experts_int8")
    expert_bytes = 3 * 512 * 256 + (512 + 512 + 256) * 4
    report = actor.stage(1, {0: [1, 5], 1: [0, 1]})
    old, new = actor.versions[0][0], actor.versions[1][0]
    assert isinstance(new.w1[0], Int8Weight) and new.w1[0] is old.w1[1]  # expert 1: the same int8 weights
    assert report["bytes_loaded"] == expert_bytes  # expert 5 only

    torch.manual_seed(0)
    hidden = torch.randn(6, 256)  # [T, D]
    local = torch.tensor([[0, 1], [1, -1], [0, 0], [-1, 1], [1, 0], [0, -1]], dtype=torch.int32)  # [T, K] into [1, 5]
    weights = torch.rand(6, 2)
    reply = ExpertReply.decode(actor.run_experts(ExpertBatch(0, 3, hidden, local, weights, 1).encode()))
    config = ModelConfig.from_model_dir(mixtral_dir)
    every = LocalExperts.from_checkpoint(CheckpointReader(mixtral_dir, config), torch.float32, quantization="experts_int8")
    global_ids = torch.where(local >= 0, local * 4 + 1, 0)  # local 0 -> expert 1, 1 -> expert 5
    expected = every(0, hidden, RouterOutput(weights=torch.where(local >= 0, weights, 0.0), expert_ids=global_ids))
    torch.testing.assert_close(reply.rows, expected, rtol=0, atol=1e-6)


def test_quantization_is_checked_at_the_edge(mixtral_dir):
    with pytest.raises(ValueError, match="quantization must be one of none, experts_int8"):
        EngineConfig(model_dir=str(mixtral_dir), quantization="fp8")
    with pytest.raises(ValueError, match="runs the experts on the CPU"):
        EngineConfig(model_dir=str(mixtral_dir), quantization="experts_int8", device="cuda")
    with pytest.raises(ValueError, match="runs the experts on the CPU"):
        EngineConfig(model_dir=str(mixtral_dir), quantization="experts_int8", cluster={"expert_actors": 2, "use_gpus": True})
    config = ModelConfig.from_model_dir(mixtral_dir)
    with pytest.raises(ValueError, match="runs the experts on the CPU, not on meta"):  # as on a GPU ``auto`` picked
        load_expert_stacks(CheckpointReader(mixtral_dir, config), {0: [0]}, torch.float32, "meta", "experts_int8")
    assert not actors_use_gpus(EngineConfig(model_dir=str(mixtral_dir), quantization="experts_int8"))


def test_int8_experts_on_threads_give_the_same_logits(mixtral_dir):
    threads = torch.get_num_threads()  # an engine with expert threads sets torch's to 1 for the process
    try:
        with LLM(mixtral_dir, quantization="experts_int8") as one, LLM(mixtral_dir, quantization="experts_int8", expert_threads=2) as two:
            for prompt in PROMPTS:
                assert torch.equal(one.logits(prompt), two.logits(prompt))
    finally:
        torch.set_num_threads(threads)
