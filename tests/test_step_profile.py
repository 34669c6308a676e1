"""The step profiler (``cluster/loadtest/step_profile.py``) on the CPU: real figures from a real engine."""

from __future__ import annotations

import sys

from moeshard.cluster.loadtest.step_profile import format_profiles, parse_args, run


def test_step_profile_counts_the_steps_and_ops_of_each_workload(tiny_mixtral_dir):
    args = parse_args(["--prefill-len", "40", "--sequences", "3", "--prompt-len", "8", "--tokens", "4", "--table", "3"])
    prefill, decode = run(tiny_mixtral_dir, args)
    assert (prefill.workload, prefill.steps) == ("prefill 40", 1)
    assert (decode.workload, decode.steps) == ("decode 3 x 4", 4)
    for p in (prefill, decode):
        assert p.wall_ms > 0 and p.ops > 10  # every step runs the model's ops
        assert p.device_busy_ms == p.launches == p.syncs == 0  # the CPU: no CUDA kernels, copies or syncs
        assert "aten::" in p.table
    printed = format_profiles([prefill, decode])
    assert "| prefill 40 | 1 |" in printed and "| decode 3 x 4 | 4 |" in printed


def test_host_plan_threshold_is_set_on_the_permute_module(tiny_mixtral_dir, monkeypatch, capsys):
    import moeshard.kernels.permute  # noqa: F401 (the module: moeshard.kernels.permute as a name is the function)
    from moeshard.cluster.loadtest.step_profile import main

    module = sys.modules["moeshard.kernels.permute"]
    monkeypatch.setattr(module, "HOST_PLAN_MAX_IDS", module.HOST_PLAN_MAX_IDS)  # restored after the test
    args = [str(tiny_mixtral_dir), "--prefill-len", "16", "--sequences", "2", "--prompt-len", "4", "--tokens", "2"]
    assert main([*args, "--host-plan-max-ids", "0"]) == 0
    assert module.HOST_PLAN_MAX_IDS == 0
    assert "permutations of up to 0 device ids planned on the host" in capsys.readouterr().out
