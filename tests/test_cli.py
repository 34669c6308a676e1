"""The installed ``moeshard`` command, run as a subprocess: help, chat and bench against a live server, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeshard.cluster.client import Client

API_KEY = "cli-key"
MODEL = "tiny"
MOESHARD = shutil.which("moeshard", path=str(Path(sys.executable).parent)) or shutil.which("moeshard")


def moeshard(*args: str, stdin: str = "", timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOESHARD_API_KEY"}
    return subprocess.run([MOESHARD, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory, live_server):
    model_dir = tiny_checkpoint_factory("tiny_cli", seed=5, with_tokenizer=True, max_position_embeddings=512)
    with live_server({"/": {"model_dir": str(model_dir), "model_name": MODEL, "api_key": API_KEY, "expert_actors": 1}}) as url:
        yield url


def test_the_entry_point_is_installed():
    assert MOESHARD is not None and Path(MOESHARD).is_file()


@pytest.mark.parametrize("command", [[], ["generate"], ["serve"], ["chat"], ["bench"], ["routing"], ["demo-model"]])
def test_help_on_every_command(command):
    out = moeshard(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: moeshard {' '.join(command)}".rstrip())
    assert out.stderr == ""


def test_chat_with_piped_input_keeps_the_conversation(server):
    system = "Answer briefly."
    turns = ["Hello there", "And what is the capital of France?"]
    out = moeshard(
        "chat", "--url", server, "--api-key", API_KEY, "--system", system, "--temperature", "0", "--max-tokens", "6",
        stdin="\n".join([turns[0], "", turns[1], "/exit", "never sent"]) + "\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr

    # The same conversation through the SDK: the second reply saw the first turn.
    history = [{"role": "system", "content": system}]
    replies = []
    with Client(server, API_KEY, max_retries=0, timeout=120) as client:
        for turn in turns:
            history.append({"role": "user", "content": turn})
            replies.append(client.chat(history, max_tokens=6, temperature=0).text)
            history.append({"role": "assistant", "content": replies[-1]})
    assert out.stdout == "".join(reply + "\n" for reply in replies)
    assert out.stderr == ""  # no prompt or banner when stdin is not a terminal

    at_eof = moeshard("chat", "--url", f"{server}/v1", "--api-key", API_KEY, "--temperature", "0", "--max-tokens", "3", stdin="Hi")
    assert at_eof.returncode == 0 and at_eof.stdout.endswith("\n") and len(at_eof.stdout) > 1


def test_chat_reports_a_refused_turn_and_goes_on(server):
    out = moeshard(
        "chat", "--url", server, "--api-key", API_KEY, "--max-tokens", "600", stdin="too long a reply\n/exit\n"
    )  # fmt: skip
    assert out.returncode == 0
    assert out.stderr.startswith("moeshard: error: 400 invalid_request_error:") and "512" in out.stderr


def test_bench_writes_a_table_and_json(server, tmp_path):
    report_path = tmp_path / "bench.json"
    out = moeshard(
        "bench", "--url", server, "--api-key", API_KEY, "--concurrency", "2", "--requests", "4",
        "--prompt-len", "16", "--output-len", "5", "--json", str(report_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| concurrency |" in out.stdout and "output tok/s" in out.stdout
    assert "bench [" in out.stderr and "4/4" in out.stderr  # the progress line
    report = json.loads(report_path.read_text())
    assert report["completed"] == 4 and report["failed"] == 0
    assert [r["output_tokens"] for r in report["records"]] == [5] * 4  # ignore_eos: exactly --output-len each
    assert all(r["text"] for r in report["records"])  # each completion's text, to compare servers by
    assert 8 <= report["mean_prompt_tokens"] <= 32
    assert 0 < report["ttft_p50_s"] <= report["ttft_p99_s"] and 0 < report["tpot_p50_s"] <= report["tpot_p99_s"]
    assert report["output_throughput"] > 0 and report["spec"]["concurrency"] == 2

    poisson = moeshard("bench", "--url", server, "--api-key", API_KEY, "--request-rate", "20", "--requests", "3", "--output-len", "2")
    assert poisson.returncode == 0, poisson.stderr
    assert "| - | 20 | 3 |" in poisson.stdout


def test_bench_multi_turn_chats_resend_their_history(server, tmp_path):
    report_path = tmp_path / "chat.json"
    out = moeshard(
        "bench", "--url", server, "--api-key", API_KEY, "--concurrency", "2", "--requests", "2", "--turns", "3",
        "--shared-prefix-len", "40", "--prompt-len", "8", "--output-len", "4", "--json", str(report_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "TTFT p50 by turn (ms):" in out.stdout and "2/2" in out.stderr
    report = json.loads(report_path.read_text())
    assert report["completed"] == 6 and report["failed"] == 0 and len(report["turn_ttft_p50_s"]) == 3
    turns = [r["turn"] for r in report["records"]]
    assert sorted(turns) == [0, 0, 1, 1, 2, 2]
    for conversation in (report["records"][:3], report["records"][3:]):
        assert [r["turn"] for r in conversation] == [0, 1, 2]
        assert conversation[0]["prompt_tokens"] >= 40  # the shared system prompt
        for before, after in zip(conversation, conversation[1:]):  # each turn resends the last one and its answer
            assert after["prompt_tokens"] >= before["prompt_tokens"] + before["output_tokens"] + 8


def test_one_line_errors(server, tmp_path, free_port):
    down = f"http://127.0.0.1:{free_port()}"
    cases = [
        (["generate", str(tmp_path / "missing"), "--prompt", "hi"], f"model directory '{tmp_path / 'missing'}' does not exist"),
        (["serve", str(tmp_path / "missing")], f"model directory '{tmp_path / 'missing'}' does not exist"),
        (["chat", "--url", down], f"cannot reach {down}: connection refused"),
        (["bench", "--url", down, "--requests", "2"], f"cannot reach {down}: connection refused"),
        (["chat", "--url", server, "--api-key", "wrong"], "401 authentication_error: invalid or missing API key"),
        (["bench", "--url", server, "--api-key", API_KEY, "--json", str(tmp_path / "no" / "r.json")], "its directory does not exist"),
        (["bench", "--url", server, "--requests", "0"], "--requests: Input should be greater than or equal to 1"),
        (["bench", "--url", "localhost:8000"], "--url: the server URL must start with http:// or https://"),
        (["chat", "--url", server, "--bogus"], "unrecognized arguments: --bogus"),
    ]
    for args, message in cases:
        out = moeshard(*args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("moeshard: error: ") and message in last, (args, out.stderr)
        assert "Traceback" not in out.stderr
    bad_type = moeshard("bench", "--url", server, "--concurrency", "many")
    assert bad_type.returncode == 2 and "invalid int value: 'many'" in bad_type.stderr


def test_generate_uses_the_models_generation_config(tiny_checkpoint_factory):
    from moeshard.cluster import LLM, SamplingParams

    model_dir = tiny_checkpoint_factory("tiny_cli_defaults", seed=5, with_tokenizer=True, max_position_embeddings=512)
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 6, "repetition_penalty": 1.3}))
    out = moeshard("generate", str(model_dir), "--prompt", "The capital of France is")
    assert out.returncode == 0, out.stderr
    with LLM(model_dir) as llm:
        expected = llm.generate("The capital of France is", SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3))[0]
    assert out.stdout == expected.text + "\n"
    assert len(expected.token_ids) == 6 or expected.finish_reason == "stop"


def test_generate_with_int8_experts(tiny_checkpoint_factory):
    from moeshard.cluster import LLM, SamplingParams

    model_dir = tiny_checkpoint_factory("tiny_cli_int8", seed=7, with_tokenizer=True, max_position_embeddings=512)
    out = moeshard("generate", str(model_dir), "--prompt", "The capital of France is", "--quantization", "experts_int8",
                   "--max-tokens", "8", "--temperature", "0")  # fmt: skip
    assert out.returncode == 0, out.stderr
    with LLM(model_dir, quantization="experts_int8") as llm:
        expected = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.stdout == expected.text + "\n"
    bad = moeshard("generate", str(model_dir), "--prompt", "x", "--quantization", "fp8")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr


def test_serve_checks_its_engine_flags_before_starting(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("tiny_cli_redundant", seed=6)
    cases = [
        (["--redundant-experts", "2"], "redundant_experts needs at least 2 expert actors, got 0"),
        (["--expert-actors", "2", "--redundant-experts", "-1"], "redundant_experts: Input should be greater than or equal to 0"),
        (["--expert-actors", "2", "--expert-threads", "2"], "expert_threads share out experts in this process: it needs expert_actors = 0"),
        (["--expert-threads", "0"], "expert_threads: Input should be greater than or equal to 1"),
        (["--expert-actors", "2", "--coordinator-cpus", "0"], "coordinator_cpus: Input should be greater than or equal to 1"),
        (["--lm-head-threads", "0"], "lm_head_threads: Input should be greater than or equal to 1"),
        (["--quantization", "experts_int8", "--device", "cuda"], "quantization 'experts_int8' runs the experts on the CPU"),
        (["--batch-invariant", "--device", "cuda"], "batch_invariant runs on the CPU"),
    ]
    for flags, message in cases:
        out = moeshard("serve", str(model_dir), *flags)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and last.startswith("moeshard: error: ") and message in last, out.stderr
        assert "Traceback" not in out.stderr
