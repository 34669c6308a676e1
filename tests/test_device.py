"""Device and dtype settings: ``auto`` resolves on the machine that runs the model; bad names fail in one line."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moeshard.cluster import LLM, SamplingParams
from moeshard.cluster.engine.config import EngineConfig
from moeshard.cluster.model.device import resolve_device, resolve_dtype
from moeshard.deploy.app import replica_wants_gpu

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")


@no_gpu
def test_auto_is_the_cpu_in_float32_without_a_gpu(tiny_mixtral_dir):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with LLM(tiny_mixtral_dir) as llm:
        model = llm._engine.model
        assert model.device.type == "cpu" and model.dtype == torch.float32
        assert llm._engine.cache.keys.dtype == torch.float32


@no_gpu
def test_asking_for_cuda_without_one_says_so(tiny_mixtral_dir):
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        LLM(tiny_mixtral_dir, device="cuda")
    assert not replica_wants_gpu("auto") and not replica_wants_gpu("cpu") and replica_wants_gpu("cuda:1")


@pytest.mark.parametrize("fields, fragment", [({"device": "tpu"}, "device must be"), ({"dtype": "int8"}, "dtype must be")])
def test_bad_device_or_dtype_names_are_refused(tmp_path, fields, fragment):
    with pytest.raises(ValidationError, match=fragment):
        EngineConfig(model_dir=str(tmp_path), **fields)


def test_bfloat16_on_the_cpu_stays_close_to_float32(tiny_mixtral_dir):
    prompt = [1, 5, 9, 33, 17, 2, 64]
    with LLM(tiny_mixtral_dir, device="cpu", dtype="float32") as full, LLM(tiny_mixtral_dir, dtype="bfloat16") as half:
        assert half._engine.model.dtype == torch.bfloat16
        expected, got = full.logits(prompt), half.logits(prompt)
        assert got.dtype == torch.float32 and (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        assert len(half.generate([prompt], params)[0].token_ids) == 4
