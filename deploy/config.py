"""The server's settings: one pydantic tree, validated once when the application is built."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeshard.cluster.engine.config import EngineConfig
from moeshard.deploy.edge import EdgeSettings
from moeshard.deploy.limits import Limits


class ServeArgs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: str
    model_name: str | None = None  # the id clients send as "model"; default: the directory's name
    api_key: str | None = Field(default=None, min_length=1)
    # Or the name of an environment variable holding the key, read by the replica when it starts, so the key
    # is in no Serve config (Ray's dashboard shows application args): e.g. from a Kubernetes Secret.
    api_key_env: str | None = Field(default=None, min_length=1)
    public_docs: bool = False  # /docs, /redoc, /openapi.json open without the API key
    public_metrics: bool = False  # /metrics open without the API key
    client_header: str | None = None  # a trusted proxy's header naming the client (e.g. x-forwarded-for); default: peer address
    expert_actors: int = Field(default=0, ge=0)
    # Coordinator replicas (attention, KV cache, routers) over one shared pool of expert actors: M:N.
    coordinators: int = Field(default=1, ge=1)
    device: str = "auto"  # the coordinator's: auto (a GPU when the cluster has one), cpu, cuda or cuda:N
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    ray_address: str | None = None
    max_waiting: int = Field(default=256, ge=1)  # requests queued beyond the running batch; more get 503
    max_ongoing_requests: int = Field(default=1024, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)  # a request still unfinished after this fails
    limits: Limits = Field(default_factory=Limits)
    routing_window: int = Field(default=4096, ge=1)  # /v1/experts' repetition rates: over this many recent token pairs
    engine: dict = Field(default_factory=dict)  # further EngineConfig fields (kv_cache_bytes, max_running, cluster: {...}, ...)

    @field_validator("model_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Resolved where the app is built (``moeshard serve`` or ``serve run``), not in the replica."""
        return str(Path(value).expanduser().absolute())

    @model_validator(mode="after")
    def _one_key_source(self) -> "ServeArgs":
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name

    def engine_config(self) -> EngineConfig:
        """The coordinators' engine settings. With expert actors, the pool is a shared service (named after the
        model and a digest of the settings it must agree on, unless ``engine.cluster.pool_name`` names it)."""
        fields = dict(self.engine)
        cluster = dict(fields.pop("cluster", {}))
        cluster.update(expert_actors=self.expert_actors, ray_address=self.ray_address)
        config = EngineConfig(model_dir=self.model_dir, device=self.device, dtype=self.dtype, cluster=cluster, **fields)
        if config.cluster.expert_actors == 0:
            return config
        if self.coordinators > 1 and config.cluster.transport == "compiled_graph":
            raise ValueError("the compiled_graph transport serves one coordinator per pool: use socket or actor_calls with coordinators > 1")
        if config.cluster.pool_name is None:
            config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"pool_name": self.pool_name(config)})})
        if config.cluster.actor_concurrency is None:  # each coordinator's call runs beside the others'
            config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"actor_concurrency": self.coordinators})})
        return config

    def pool_name(self, config: EngineConfig) -> str:
        digest = hashlib.sha256(json.dumps(config.pool_signature(), sort_keys=True).encode()).hexdigest()[:10]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.served_model_name)[:64]
        return f"moeshard-{slug}-{digest}"

    def resolved_api_key(self) -> str | None:
        """The key: ``api_key``, or the value of ``api_key_env`` in this process's environment (which must be set)."""
        if self.api_key_env is None:
            return self.api_key
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"api_key_env names {self.api_key_env!r}, which is not set (or empty) in the server's environment")
        return key

    def edge_settings(self) -> EdgeSettings:
        return EdgeSettings(
            api_key=self.resolved_api_key(),
            public_docs=self.public_docs,
            public_metrics=self.public_metrics,
            max_body_bytes=self.limits.max_body_bytes,
        )


def replica_cpus(config: EngineConfig) -> int:
    """CPUs a replica asks Ray for, and its torch threads: the coordinator's (``cluster.coordinator_cpus``), or
    the threads its in-process experts run on (``expert_threads``) if more."""
    return max(config.cluster.coordinator_cpus, config.expert_threads)
