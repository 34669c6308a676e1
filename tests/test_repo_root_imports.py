"""The repository's top-level ``kernels/`` is harmless under its bare name (Hugging Face ships a ``kernels`` package).

A Python started in the repository root has the root on ``sys.path``: there, ``import kernels`` must run no
moeshard code and transformers' probe for its ``kernels`` package must find none, whether moeshard is installed
or not. Ray workers of a driver started in such a directory must not get it on their paths at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Makes moeshard uninstalled for this interpreter: drop its import finders and any path entry that holds it.
HIDE_MOESHARD = """
import importlib.util, os, sys
def _ours(obj):
    return "moeshard" in (getattr(obj, "__module__", None) or "")
sys.meta_path[:] = [f for f in sys.meta_path if not _ours(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _ours(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not os.path.isdir(os.path.join(p or ".", "moeshard"))]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("moeshard") is None, "moeshard is still importable"
"""

TRANSFORMERS_PROBE = """
import json, sys
from transformers.utils import import_utils
available = import_utils.is_kernels_available()
exists, version = import_utils._is_package_available("kernels", return_version=True)
print(json.dumps({"available": available, "exists": exists, "version": version,
                  "moeshard_modules": sorted(m for m in sys.modules if m.startswith("moeshard"))}))
"""

BARE_IMPORT = """
import json, sys
import kernels
print(json.dumps({"names": sorted(n for n in vars(kernels) if not n.startswith("__")),
                  "file": kernels.__file__, "path": list(kernels.__path__),
                  "moeshard_modules": sorted(m for m in sys.modules if m.startswith("moeshard"))}))
"""


def _run_in_repo_root(code: str) -> dict:
    """A fresh interpreter started with ``-c`` in the repository root (so the root is on its sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("installed", [True, False], ids=["moeshard_installed", "moeshard_not_installed"])
def test_transformers_probe_finds_no_kernels_package(installed):
    result = _run_in_repo_root(("" if installed else HIDE_MOESHARD) + TRANSFORMERS_PROBE)
    assert result["available"] is False
    assert result["exists"] is False and result["version"] == "N/A"
    assert result["moeshard_modules"] == []


@pytest.mark.parametrize("installed", [True, False], ids=["moeshard_installed", "moeshard_not_installed"])
def test_bare_import_of_kernels_runs_no_moeshard_code(installed):
    result = _run_in_repo_root(("" if installed else HIDE_MOESHARD) + BARE_IMPORT)
    assert result["path"] == [str(REPO_ROOT / "kernels")]  # it really is the repository's folder
    assert result["names"] == []
    assert result["file"] is None
    assert result["moeshard_modules"] == []


def test_moeshard_kernels_keeps_its_api():
    import moeshard.kernels as kernels

    for name in ("route", "permute", "combine", "expert_ffn"):
        assert callable(getattr(kernels, name)), name
    assert kernels.__file__ is not None and kernels.__name__ == "moeshard.kernels"


RAY_WORKER_PATHS = """
import importlib.util, json, os, sys
import ray
from moeshard.actors.ray_init import connect_ray
from moeshard.cluster.engine.config import EngineConfig

@ray.remote
def probe():
    return {"kernels_found": importlib.util.find_spec("kernels") is not None, "sys_path": sys.path}

here = os.getcwd()
results = {}
ray.init(num_cpus=1, include_dashboard=False)  # plain Ray: the driver's directory reaches the workers
results["plain"] = ray.get(probe.remote())
ray.shutdown()
connect_ray(EngineConfig(model_dir="model"))
results["moeshard"] = ray.get(probe.remote())
results["driver_cwd_kept"] = os.getcwd() == here
ray.shutdown()
print(json.dumps(results))
"""


@pytest.mark.slow
def test_ray_workers_do_not_get_the_drivers_directory(tmp_path):
    """A driver started in a folder holding ``kernels/`` (as the repository root does) leaves it off the workers' paths."""
    root = tmp_path / "checkout"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("")
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray")}  # short: Ray's socket paths are bounded
    done = subprocess.run(
        [sys.executable, "-c", RAY_WORKER_PATHS], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plain"]["kernels_found"] and str(root) in result["plain"]["sys_path"]  # the hazard is real
    assert not result["moeshard"]["kernels_found"]
    assert str(root) not in result["moeshard"]["sys_path"]
    assert result["driver_cwd_kept"]
