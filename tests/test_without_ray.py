"""The model, the engine, the kernels and the GPU tests work where Ray and the serving packages are not installed.

A GPU machine may carry only torch's stack (torch, triton, transformers, tokenizers, sentencepiece, msgpack,
pytest, plus pydantic): ``tests/gpu/run_checks.sh`` runs there. Each check runs in a fresh interpreter where
those packages cannot be imported (``sys.modules[name] = None``: an import fails, and a probe such as
``importlib.util.find_spec`` finds nothing, as when the package is absent).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "mistral_common", "openai", "gguf", "fastapi", "starlette", "uvicorn")
HIDE = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_packages_are_hidden():
    done = _run("import ray")
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


def test_the_engine_generates_without_ray(tiny_checkpoint_factory):
    checkpoint = tiny_checkpoint_factory("without_ray", seed=11, num_hidden_layers=2)
    done = _run(
        "from moeshard.cluster import LLM, SamplingParams\n"
        "import moeshard.actors.collective.link, moeshard.kernels\n"
        f"with LLM({str(checkpoint)!r}) as llm:\n"
        "    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
        "print(len(out[0].token_ids))\n"
        "print(sorted(m for m in sys.modules if m.startswith('moeshard.deploy')))\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["4", "[]"]


def test_the_gpu_tests_collect_without_ray():
    done = _run("import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/gpu']))\n")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "error" not in done.stdout.lower(), done.stdout[-3000:]
    assert "test_rows_cross_between_gpus_over_nccl" in done.stdout  # the collective channel's test, Ray-free


def test_the_gpu_benchmarks_import_without_ray():
    """What a GPU machine without Ray runs: tests/gpu/run_checks.sh's benchmarks and the step profiler."""
    done = _run(
        "import moeshard.cluster.loadtest.prefill_bench, moeshard.cluster.loadtest.step_profile\n"
        "import moeshard.kernels.benchmarks.kernels\n"
    )
    assert done.returncode == 0, done.stderr[-3000:]
