"""``tests/gpu/run_checks.sh`` on a machine without a GPU: every step runs or says why not, and the report holds them.

The GPU tests skip and the model benchmark is left out; the kernel benchmark runs its CPU sections. What the
script does on a GPU is what ``tests/gpu`` and the benchmarks do there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the whole GPU suite")
def test_the_checks_report_every_step_without_a_gpu(tmp_path):
    report = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable, STEP_LIMITS="120 120 60 60 60")
    done = subprocess.run(
        ["bash", "tests/gpu/run_checks.sh", str(report)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (report / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["tests", "kernels", "model", "profile", "device_plan"]
    assert summary[0].startswith("tests: exit 0 ") and summary[1].startswith("kernels: exit 0 ")
    assert summary[2:] == [f"{name}: skipped, no CUDA GPU" for name in ("model", "profile", "device_plan")]
    tests_log = (report / "tests.log").read_text()
    assert "skipped" in tests_log and "error" not in tests_log.lower()
    assert "## Triton kernels, interpreter" in (report / "kernels.log").read_text()
    assert "torch " in (report / "machine.txt").read_text()


def test_the_checks_need_a_report_folder():
    done = subprocess.run(["bash", "tests/gpu/run_checks.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr
