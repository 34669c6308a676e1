"""GPU tests: every test here is marked ``gpu`` and skipped without CUDA (``make test-gpu`` runs them).

They run the Triton kernels compiled, not interpreted: run them with ``TRITON_INTERPRET=0`` (as ``make
test-gpu`` does), since the suite's root conftest turns the interpreter on for CPU machines.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "gpu")
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def compiled_triton():
    from moeshard.kernels import triton_interprets

    if triton_interprets():
        pytest.skip("Triton runs through its interpreter here: run with TRITON_INTERPRET=0 (make test-gpu)")
