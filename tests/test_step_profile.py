"""The step profiler (``cluster/loadtest/step_profile.py``) on the CPU: real figures from a real engine."""

from __future__ import annotations

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
