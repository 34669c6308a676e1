"""The peer benchmark: each server started in turn from its command, loaded, stopped, and its outputs compared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MOESHARD = shutil.which("moeshard", path=str(Path(sys.executable).parent)) or shutil.which("moeshard")


def peer_bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moeshard.cluster.loadtest.peer_bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_a_server_that_exits_is_reported_with_its_log():
    out = peer_bench("--server", "broken", "echo no such model on {port}; exit 3", "--startup-timeout", "30", timeout=60)
    assert out.returncode == 1
    assert "server 'broken' exited with 3" in out.stderr and "no such model on" in out.stderr


def test_a_command_without_a_port_is_refused():
    out = peer_bench("--server", "a", "sleep 1", timeout=60)
    assert out.returncode == 2 and "must contain {port}" in out.stderr


@pytest.mark.slow
def test_two_servers_in_turn_give_the_same_texts_and_are_stopped(tiny_checkpoint_factory, tmp_path, tmp_path_factory, pids_mentioning):
    model_dir = tiny_checkpoint_factory("tiny_peer", seed=9, with_tokenizer=True, max_position_embeddings=512)
    ray_tmp = tmp_path_factory.mktemp("ray")
    serve = f"env -u RAY_ADDRESS RAY_TMPDIR={ray_tmp} {MOESHARD} serve {model_dir} --expert-actors 0 --port {{port}}"
    report_path = tmp_path / "peer.json"
    out = peer_bench(
        "--server", "cached", serve, "--server", "uncached", f"{serve} --no-prefix-caching",
        "--concurrency", "1,3", "--scale", "0.25", "--prompt-len", "12", "--output-len", "6", "--json", str(report_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(report_path.read_text())
    cached, uncached = result["servers"]
    assert (cached["name"], uncached["name"]) == ("cached", "uncached")
    for server in (cached, uncached):
        assert [r["spec"]["concurrency"] for r in server["reports"]] == [1, 3]
        for report in server["reports"]:
            assert report["completed"] == 4 and report["failed"] == 0
            assert all(r["output_tokens"] == 6 and r["text"] for r in report["records"])
    for mine, theirs in zip(uncached["reports"], cached["reports"]):  # same prompts, same model, greedy
        assert [r["text"] for r in mine["records"]] == [r["text"] for r in theirs["records"]]
    assert "| uncached | 3 | 4 | 0 |" in out.stdout and out.stdout.count("| 4/4 |") == 4
    assert pids_mentioning(str(ray_tmp)) == []  # each server, and its Ray, stopped before the next started
