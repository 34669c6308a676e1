"""Backend selection: auto picks by device, MOESHARD_KERNEL_BACKEND overrides auto, explicit wins."""

from __future__ import annotations

import pytest
import torch

from moeshard.kernels import ENV_VAR, resolve_backend, triton_interprets

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_follows_the_device(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("auto", CUDA) == "triton"


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend("auto", CPU) == "triton"  # runs under the interpreter in this suite
    assert resolve_backend("torch", CPU) == "torch"
    monkeypatch.setenv(ENV_VAR, " Torch ")
    assert resolve_backend("auto", CUDA) == "torch"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend("auto", CUDA) == "triton"


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv(ENV_VAR, "numpy")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto", CPU)


def test_the_suite_runs_triton_through_its_interpreter():
    assert triton_interprets()


def test_environment_reaches_the_ops(monkeypatch):
    import importlib

    from moeshard.kernels import route

    module = importlib.import_module("moeshard.kernels.route")  # the attribute `route` is the function
    calls = []
    real = module.route_triton
    monkeypatch.setattr(module, "route_triton", lambda *args: calls.append(1) or real(*args))
    logits = torch.randn(5, 4)
    route(logits, 2)
    assert calls == []
    monkeypatch.setenv(ENV_VAR, "triton")
    route(logits, 2)
    assert calls == [1]


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    import importlib

    backend = importlib.import_module("moeshard.kernels.backend")
    monkeypatch.setattr(backend, "triton_interprets", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU)
    assert resolve_backend("triton", CUDA) == "triton"
