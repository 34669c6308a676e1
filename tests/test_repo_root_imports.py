"""The repository's top-level ``kernels/`` is harmless under its bare name (Hugging Face ships a ``kernels`` package).

A Python started in the repository root has the root on ``sys.path``: there, ``import kernels`` must run no
moeshard code and give what it gives anywhere else (the installed ``kernels``, which transformers imports
from 5.25 on, or nothing), whether moeshard is installed or not. Ray workers of a driver started in such a
directory must not get it on their paths at all.
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

# Leaves only the standard library beside the working directory: no installed ``kernels`` to be found.
HIDE_SITE_PACKAGES = """
import sys
sys.path[:] = [p for p in sys.path if "-packages" not in p]
sys.path_importer_cache.clear()
"""

TRANSFORMERS_PROBE = """
import json, sys
from transformers.utils import import_utils
available = import_utils.is_kernels_available()
exists, version = import_utils._is_package_available("kernels", return_version=True)
from transformers import MixtralForCausalLM  # its modeling code imports ``kernels`` where that is available
print(json.dumps({"available": available, "exists": exists, "version": version,
                  "moeshard_modules": sorted(m for m in sys.modules if m.startswith("moeshard"))}))
"""

BARE_IMPORT = """
import json, sys
try:
    import kernels
except ModuleNotFoundError:
    print(json.dumps({"found": False}))
    raise SystemExit
print(json.dumps({"found": True, "names": sorted(n for n in vars(kernels) if not n.startswith("__")),
                  "file": kernels.__file__, "path": list(kernels.__path__),
                  "moeshard_modules": sorted(m for m in sys.modules if m.startswith("moeshard"))}))
"""


def _run(code: str, cwd: Path) -> dict:
    """A fresh interpreter started with ``-c`` in ``cwd`` (so ``cwd`` is on its sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("installed", [True, False], ids=["moeshard_installed", "moeshard_not_installed"])
def test_transformers_sees_in_the_root_what_it_sees_elsewhere(installed, tmp_path):
    code = ("" if installed else HIDE_MOESHARD) + TRANSFORMERS_PROBE
    in_root, elsewhere = _run(code, REPO_ROOT), _run(code, tmp_path)
    assert in_root == elsewhere
    assert in_root["moeshard_modules"] == []


@pytest.mark.parametrize("installed", [True, False], ids=["moeshard_installed", "moeshard_not_installed"])
def test_bare_import_of_kernels_in_the_root_gets_what_it_gets_elsewhere(installed, tmp_path):
    code = ("" if installed else HIDE_MOESHARD) + BARE_IMPORT
    in_root, elsewhere = _run(code, REPO_ROOT), _run(code, tmp_path)
    if elsewhere["found"]:  # an installed ``kernels`` (transformers 5.25 on depends on it): the same package
        assert in_root == elsewhere
        assert Path(in_root["file"]).parent != REPO_ROOT / "kernels"
    else:
        _assert_empty_stub(in_root)
    assert in_root["moeshard_modules"] == []


@pytest.mark.parametrize("installed", [True, False], ids=["moeshard_installed", "moeshard_not_installed"])
def test_bare_import_of_kernels_without_an_installed_one_is_an_empty_stub(installed):
    _assert_empty_stub(_run(HIDE_SITE_PACKAGES + ("" if installed else HIDE_MOESHARD) + BARE_IMPORT, REPO_ROOT))


def _assert_empty_stub(result: dict) -> None:
    assert result["found"]
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
    spec = importlib.util.find_spec("kernels")  # the checkout's folder, an installed ``kernels``, or none
    return {"kernels_at": None if spec is None else list(spec.submodule_search_locations or []), "sys_path": sys.path}

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
    checkout_kernels = str(root / "kernels")
    assert result["plain"]["kernels_at"] == [checkout_kernels] and str(root) in result["plain"]["sys_path"]  # the hazard
    assert checkout_kernels not in (result["moeshard"]["kernels_at"] or [])  # an installed ``kernels`` or none
    assert str(root) not in result["moeshard"]["sys_path"]
    assert result["driver_cwd_kept"]
