"""The whole model in one process on a GPU against the same checkpoint on the CPU, and against transformers."""

from __future__ import annotations

import pytest
import torch

from moeshard.cluster import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4]]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("gpu_model", seed=3, sliding_window=6, num_hidden_layers=3)


def test_auto_picks_the_gpu_and_bfloat16(checkpoint):
    with LLM(checkpoint) as llm:
        model = llm._engine.model
        assert model.device.type == "cuda" and model.dtype == torch.bfloat16
        assert llm._engine.cache.keys.device.type == "cuda"


def test_float32_logits_on_cuda_equal_the_cpu(checkpoint):
    with LLM(checkpoint, device="cpu", dtype="float32") as cpu:
        expected = [cpu.logits(p) for p in PROMPTS]
    with LLM(checkpoint, device="cuda", dtype="float32") as gpu:
        got = [gpu.logits(p) for p in PROMPTS]
    for ours, theirs in zip(got, expected):
        assert ours.device.type == "cpu" and ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-3  # TF32 matmuls and other reduction orders


def test_greedy_and_seeded_tokens_on_cuda_equal_the_cpu(checkpoint):
    params = [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
    ]
    with LLM(checkpoint, device="cpu", dtype="float32") as cpu:
        expected = [[o.token_ids for o in cpu.generate(PROMPTS, p)] for p in params]
    with LLM(checkpoint, device="cuda", dtype="float32") as gpu:
        assert gpu.engine.greedy_on_device is None  # the default: greedy steps take their argmaxes on the GPU
        got = [[o.token_ids for o in gpu.generate(PROMPTS, p)] for p in params]
    assert got == expected


def test_a_greedy_step_on_cuda_leaves_its_logits_there(checkpoint, monkeypatch):
    from moeshard.cluster.engine import engine as engine_module

    rows_on_host = []
    real = engine_module.Engine._sample
    monkeypatch.setattr(
        engine_module.Engine, "_sample", lambda self, seq, row, chosen=None: rows_on_host.append(row) or real(self, seq, row, chosen)
    )
    with LLM(checkpoint, device="cuda", dtype="float32") as gpu:
        gpu.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(rows_on_host) == 8 * len(PROMPTS) and all(row is None for row in rows_on_host)


def test_bfloat16_on_cuda_stays_close_to_transformers(checkpoint):
    from transformers import MixtralForCausalLM

    reference = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, experts_implementation="eager").eval()
    with LLM(checkpoint, device="cuda", dtype="bfloat16") as gpu:
        for prompt in PROMPTS:
            with torch.no_grad():
                theirs = reference(torch.tensor([prompt])).logits[0].float()
            ours = gpu.logits(prompt)
            assert (ours - theirs).abs().max().item() < 0.1 * max(theirs.abs().max().item(), 1.0)



def test_a_host_table_copied_behind_queued_work_keeps_its_values():
    """``from_host``: a step's host-built tables are copied behind the queued work (no stream sync), from a pinned
    copy, so the host tensor may change at once without changing what the kernels read."""
    from moeshard.kernels.host_copy import from_host

    cuda = torch.device("cuda")
    a = torch.randn(4096, 4096, device=cuda)
    busy = a @ a  # queued work ahead of the copy
    table = torch.arange(10_000)
    copied = from_host(table, cuda)
    table.add_(1)
    assert copied.device.type == "cuda" and torch.equal(copied.cpu(), torch.arange(10_000))
    torch.testing.assert_close(busy[0, :4], (a[0] @ a[:, :4]), rtol=1e-2, atol=1e-2)
