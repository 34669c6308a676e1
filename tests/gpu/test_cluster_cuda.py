"""The sharded cluster with the coordinator and the expert actors on GPUs equals one process, over the socket
transport (rows through the host) and the collective one (rows over NCCL)."""

from __future__ import annotations

import pytest
import torch

from moeshard.cluster import LLM, SamplingParams

ray = pytest.importorskip("ray")

PROMPTS = [[1, 5, 9, 33, 17], [1, 100, 3], [1, 7, 7, 7, 7, 7, 7, 7, 64, 12, 90, 4]]


@pytest.mark.parametrize("transport", ["socket", "collective"])
def test_gpu_expert_actors_equal_one_process(transport, tiny_checkpoint_factory, tmp_path, monkeypatch):
    if torch.cuda.device_count() < 3:
        pytest.skip("needs 3 GPUs: the coordinator's and one per expert actor")
    checkpoint = tiny_checkpoint_factory("gpu_cluster", seed=4)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(checkpoint, device="cuda", dtype="float32") as single:
        expected = [o.token_ids for o in single.generate(PROMPTS, params)]
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    cluster = {"use_gpus": True, "cpus_per_actor": 0.5, "transport": transport}  # collective: NCCL between the GPUs
    with LLM(checkpoint, expert_actors=2, device="cuda", dtype="float32", cluster=cluster) as sharded:
        got = [o.token_ids for o in sharded.generate(PROMPTS, params)]
    assert got == expected
