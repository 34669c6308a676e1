"""Every module of the package imports: a benchmark or script that only runs by hand cannot lose a name it imports
(a rename elsewhere) without a test failing."""

from __future__ import annotations

import importlib
import runpy
import sys
import types
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {  # pyproject.toml's package-dir
    "moeshard.cluster": "cluster",
    "moeshard.actors": "actors",
    "moeshard.kernels": "kernels",
    "moeshard.deploy": "deploy",
}


def module_paths() -> dict[str, Path]:
    """Every module of the package by its dotted name -> its file."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def module_names() -> list[str]:
    return list(module_paths())


def test_the_walk_finds_the_modules():
    names = module_names()
    assert "moeshard.cluster.loadtest.soak" in names and "moeshard.kernels.benchmarks.linear" in names
    assert len(names) > 100, len(names)


@pytest.mark.parametrize("name", module_names())
def test_module_imports(name):
    importlib.import_module(name)


def script_names() -> list[str]:
    """The modules that run as scripts (``python -m``), which tools such as ``python -m cProfile -m`` run through runpy."""
    return [name for name, path in module_paths().items() if "__main__" in path.read_text()]


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")  # runpy's, expected
@pytest.mark.parametrize("name", script_names())
def test_a_script_s_models_resolve_under_another_main(name, monkeypatch):
    """Run by ``runpy.run_module(name, run_name="__main__")`` without alter_sys (as ``python -m cProfile -m`` does), a
    script's ``sys.modules["__main__"]`` is another module, where pydantic looks up the names of postponed annotations:
    every pydantic model of the script must be complete all the same. (Here the other module is an empty one under a
    name of the test's, so that the script's ``main`` does not run.)"""
    run_name = "moeshard_script_under_test"
    monkeypatch.setitem(sys.modules, run_name, types.ModuleType(run_name))
    namespace = runpy.run_module(name, run_name=run_name)
    models = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == run_name]
    assert [m.__name__ for m in models if not m.__pydantic_complete__] == []
