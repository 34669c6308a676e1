"""Starting or joining Ray for moeshard, without exporting the working directory to the workers.

Ray puts the driver's working directory on every worker's ``sys.path``. Started from a
moeshard checkout, that would make the repository's top-level folders (``kernels/`` above
all, a name Hugging Face's ``kernels`` package also has) importable by bare name in every
expert actor and Serve replica. So Ray is initialised from an empty directory of its own,
and paths that workers use (the model directory) are made absolute first (``EngineConfig``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from moeshard.cluster.engine.config import EngineConfig

logger = logging.getLogger(__name__)


@contextmanager
def _in_empty_directory() -> Iterator[None]:
    empty = Path(tempfile.gettempdir()) / "moeshard-ray-cwd"  # holds no code: what workers see of the driver's cwd
    empty.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(empty)
    try:
        yield
    finally:
        os.chdir(here)


def init_ray(**options) -> None:
    """``ray.init(**options)``, with nothing of the caller's working directory on the workers' paths."""
    with _in_empty_directory():
        ray.init(**options)


def connect_ray(config: EngineConfig) -> bool:
    """Join the configured Ray cluster, or start a local one; True if this call connected."""
    if ray.is_initialized():
        return False
    address = config.cluster.ray_address
    if address is not None:
        init_ray(address=address, logging_level=logging.WARNING)
        return True
    # A local cluster with a logical CPU per actor (actors mostly wait on each other), the coordinator's and one more.
    cluster = config.cluster
    num_cpus = max(os.cpu_count() or 1, int(cluster.expert_actors * cluster.cpus_per_actor) + cluster.coordinator_cpus + 1)
    init_ray(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True
