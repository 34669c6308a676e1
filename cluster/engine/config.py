"""The engine's settings: one pydantic tree (``EngineConfig`` with its ``ClusterConfig``), validated once at the edge.

``LLM``, ``moeshard serve`` and the Serve config all build an ``EngineConfig``; nothing deeper reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moeshard.cluster.choices import DTYPE_CHOICES, QUANTIZATIONS, TRANSPORTS, check_device_name


class ClusterConfig(BaseModel):
    """Where the experts run: the number of expert actors, their placement and the dispatch transport."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    expert_actors: int = Field(default=0, ge=0)
    ray_address: str | None = None
    # expert -> actor ids, the same in every layer; None spreads experts evenly. Several actors = replicas.
    expert_map: dict[int, list[int]] | None = None
    # Extra expert slots per MoE layer, spread over the actors: replicas of the hottest experts after a rebalance.
    redundant_experts: int = Field(default=0, ge=0)
    # Rebalance on its own every this many seconds when the load window is due (see actors/rebalance/auto.py); None: never.
    auto_rebalance_s: float | None = Field(default=None, gt=0)
    auto_rebalance_threshold: float = Field(default=1.25, ge=1.0)  # worst layer's max/mean actor load that triggers it
    auto_rebalance_min_steps: int = Field(default=50, ge=1)  # steps a window must have seen
    # Extra Ray resources per expert actor (custom node resources or "node:<ip>") to pin actors to nodes.
    actor_resources: list[dict[str, float]] | None = None
    coordinator_resources: dict[str, float] = Field(default_factory=dict)
    # CPUs the coordinator (the offline coordinator actor, or each Serve replica) asks Ray for, and the torch threads
    # its own work (attention, projections, routers) runs on; the LM head's product takes EngineConfig.lm_head_threads.
    # 1 (the default) leaves the cores to the actors.
    coordinator_cpus: int = Field(default=1, ge=1, le=256)
    cpus_per_actor: float = Field(default=1.0, ge=0)
    use_gpus: bool | None = None  # None: one GPU per actor when the cluster has GPUs
    transport: str = "socket"
    placement_strategy: str = "SPREAD"
    dispatch_timeout_s: float = Field(default=60.0, gt=0)  # an actor silent this long is failed over
    recovery_timeout_s: float = Field(default=120.0, gt=0)  # how long a layer waits for Ray to restart a sole host
    startup_timeout_s: float = Field(default=600.0, gt=0)
    # A name: the expert actors are a shared, detached pool of that name, which several coordinators attach to
    # and which outlives them (actors/pool/service.py). None: the pool is this coordinator's own.
    pool_name: str | None = Field(default=None, min_length=1, max_length=200)
    pool_idle_timeout_s: float = Field(default=300.0, gt=0)  # a shared pool no coordinator checked in to stops
    # Calls an expert actor runs at once: several coordinators' layers overlap (one's rows are decoded while
    # another's are computed). None: one, or as many as there are coordinators in the server.
    actor_concurrency: int | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be a Ray placement group strategy, got {self.placement_strategy!r}")
        if self.redundant_experts and self.expert_map is not None:
            raise ValueError("redundant_experts and expert_map cannot both be set: the rebalance places the replicas")
        if self.redundant_experts and self.expert_actors < 2:
            raise ValueError(f"redundant_experts needs at least 2 expert actors, got {self.expert_actors}")
        if self.actor_resources is not None and len(self.actor_resources) != self.expert_actors:
            raise ValueError(
                f"actor_resources has {len(self.actor_resources)} entries for {self.expert_actors} expert actors"
            )
        return self


class EngineConfig(BaseModel):
    """How one model is run: the settings a user passes to ``LLM`` or ``moeshard serve``, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: str
    device: str = "auto"  # auto (CUDA when the coordinator sees a GPU), cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16
    kv_cache_bytes: int = Field(default=512 * 2**20, gt=0)
    kv_block_size: int = Field(default=16, gt=0)
    max_batch_tokens: int = Field(default=2048, gt=0)
    max_running: int = Field(default=256, gt=0)  # sequences in the running batch at once; more wait
    # With expert actors (the socket, actor_calls or collective transport), steps of at least this many sequences run as two
    # micro-batches, one's attention overlapping the other's experts. 0 (the default): never; it pays where the
    # coordinator and the actors have compute of their own (GPUs, nodes), not where they share a few cores.
    ping_pong_min_sequences: int = Field(default=0, ge=0)
    # On the CPU, the decoding sequences' keys and values kept contiguous from step to step, so a step's attention
    # copies in only its new ones instead of gathering every history each layer (kernels/decode_mirror.py; the same
    # tokens). Up to this many bytes; None (the default): as many as kv_cache_bytes; 0: off, gather every step.
    decode_mirror_bytes: int | None = Field(default=None, ge=0)
    # A decode group of fewer keys (sequences x the longest's keys) gathers them: below it the mirror was slower on
    # the CPU measured (its rows come cold from memory, a small gather's hot); the crossover is the machine's.
    decode_mirror_min_keys: int = Field(default=4096, ge=0)
    enable_prefix_caching: bool = True  # share computed KV blocks between requests whose tokens start the same
    # Experts in this process on the CPU: threads that share each layer's experts out, each product on one torch
    # thread (torch's intra-op threads are then set to 1). 1 (the default): torch's own threads run every product.
    # It pays where torch runs on one thread beside idle cores, as in a server replica (docs/performance.md).
    expert_threads: int = Field(default=1, ge=1, le=64)
    # On the CPU, the torch threads of the LM head's product, a step's largest ([R, D] x [D, V]; computed where
    # the step's last experts have replied, so the cores of the expert actors or expert threads wait meanwhile).
    # None (the default): every CPU this process may run on. 1: the process's own torch threads. The same values
    # either way (oneDNN shares out the outputs, not the sums). On 2 cores, 32 sequences decoding with 4 expert actors
    # ran 1.07x faster (docs/performance.md, "The LM head on the idle cores").
    lm_head_threads: int | None = Field(default=None, ge=1, le=1024)
    # "experts_int8": every expert's weights int8 per output channel, quantized from the checkpoint at load, with
    # activations int8 per row at each product (kernels/int8_linear.py): half the bytes of bfloat16 to read per
    # step, outputs within quantization error of the model's own. On the CPU only. "none": the model's dtype.
    quantization: str = "none"
    # A request's outputs the same bit for bit whatever else is batched with it, however its prompt is
    # chunked and whether or not it comes from the prefix cache (kernels/batch_invariance.py): products on
    # fixed row tiles, every query's attention on its own. Slower; on the CPU only.
    batch_invariant: bool = False
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    def pool_signature(self) -> dict:
        """What must agree between a shared expert pool and a coordinator attaching to it."""
        cluster = self.cluster
        return {
            "model_dir": self.model_dir,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "batch_invariant": self.batch_invariant,
            "expert_actors": cluster.expert_actors,
            "expert_map": cluster.expert_map,
            "actor_resources": cluster.actor_resources,
        }

    @field_validator("model_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """Actors and replicas do not share the caller's working directory: they get an absolute path."""
        return str(Path(value).expanduser().absolute())

    @model_validator(mode="after")
    def _check_dtype(self) -> "EngineConfig":
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        check_device_name(self.device)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        asks_for_gpus = self.device.startswith("cuda") or self.cluster.use_gpus
        if asks_for_gpus and self.quantization == "experts_int8":
            raise ValueError("quantization 'experts_int8' runs the experts on the CPU: it needs device cpu and no GPU actors")
        if asks_for_gpus and self.batch_invariant:
            raise ValueError("batch_invariant runs on the CPU: it needs device cpu and no GPU actors")
        if self.expert_threads > 1 and self.cluster.expert_actors > 0:
            raise ValueError("expert_threads share out experts in this process: it needs expert_actors = 0")
        return self
