"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90), no GPU needed.

Triton compiles ahead of time for a named target (its wheel carries ptxas). Every configuration the pruning
keeps at Mixtral 8x7B's sizes, in bfloat16 and float32 (IEEE and TF32), must compile, and its binary must
fit the part's shared memory: a configuration the autotuner would time and that cannot launch is a bug the
CPU can catch. The kernels with fixed tiles (route, the permute gather, combine, RMSNorm, rotary, rotary
with the cache store) must compile too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_every_kept_configuration_compiles_and_fits_shared_memory(tmp_path):
    report = tmp_path / "compiled.json"
    command = [sys.executable, "-m", "moeshard.kernels.benchmarks.compile_configs", "--block-m", "16", "64"]
    command += ["--kept-only", "--json", str(report)]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(report.read_text())
    kernels = {(r["kernel"], r["arch"], r["dtype"], r["precision"]) for r in records}
    autotuned = 3 * 2 * 3  # gate/up, down, attention x two parts x bfloat16, float32, TF32
    fixed = 6 * 2 * 2  # route, gather, combine, rms_norm, rotary, rotary_store x two parts x bfloat16, float32
    assert len(kernels) == autotuned + fixed, "each kernel, part and dot precision has a configuration kept"
    for r in records:
        assert r["kept"] and not r["error"], r
        assert r["shared"] is not None and r["shared"] <= r["limit"], r
