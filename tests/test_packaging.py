"""The wheel holds every module of the four folders under ``moeshard.*`` and ships the deploy configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"cluster": "moeshard/cluster", "actors": "moeshard/actors", "kernels": "moeshard/kernels", "deploy": "moeshard/deploy"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "moeshard"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "models", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("moeshard-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_module_is_in_the_wheel(wheel_files):
    expected = {
        f"{package}/{path.relative_to(REPO_ROOT / folder).as_posix()}"
        for folder, package in FOLDERS.items()
        for path in (REPO_ROOT / folder).rglob("*.py")
    }
    assert len(expected) > 60
    assert expected - wheel_files == set()


def test_deploy_configs_ship_in_the_wheel(wheel_files):
    for name in ("serve.yaml", "cluster.yaml", "rayservice.yaml"):
        assert f"moeshard/deploy/{name}" in wheel_files


def test_console_script_points_at_the_cli(wheel, wheel_files):
    (entry_points,) = [name for name in wheel_files if name.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(entry_points).decode()
    assert "moeshard = moeshard.cluster.cli:main" in text
    from moeshard.cluster.cli import main

    assert callable(main)
