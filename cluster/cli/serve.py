"""``moeshard serve``: start Ray (or join a cluster), deploy the OpenAI-compatible app, print the URL, block."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from moeshard.cluster.choices import BATCH_INVARIANT_HELP, DTYPE_CHOICES, QUANTIZATION_HELP, QUANTIZATIONS, TRANSPORTS

logger = logging.getLogger(__name__)


class _DropReconnectNotice(logging.Filter):
    """``serve.run`` after our own ``serve.start`` logs "Connecting to existing Serve app ... New http_options ...
    will not be applied", though the options it means were applied by that ``serve.start``: drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (Ray Serve), with experts on Ray actors.",
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (safetensors)")
    serve.add_argument("--expert-actors", type=int, default=0, help="expert actors to start (0: experts in the server)")
    serve.add_argument(
        "--coordinators", type=int, default=1, help="coordinator replicas sharing one pool of expert actors (default: 1)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health (visible in the process list: prefer --api-key-env)",
    )
    keys.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require 'Authorization: Bearer KEY' on every route but /health, KEY read from this environment variable "
        "(never on the command line, where other users of the machine can read it)",
    )
    serve.add_argument("--public-docs", action="store_true", help="serve /docs, /redoc and /openapi.json without the key")
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without the key")
    serve.add_argument("--model-name", default=None, help="model id clients send (default: the directory's name)")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--device", default="auto", help="the coordinator's: auto (a GPU when the cluster has one), cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 on a GPU, float32 on the CPU")
    serve.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    serve.add_argument(
        "--transport", default="socket", choices=TRANSPORTS,
        help="the dispatch data path: a TCP connection per expert actor (default), Ray actor calls, a compiled graph, "
        "or collective (tensors over a torch.distributed pair per actor: gloo on the CPU, NCCL between GPUs)",
    )  # fmt: skip
    serve.add_argument(
        "--redundant-experts", type=int, default=0, metavar="R",
        help="spare expert slots per MoE layer for replicas of experts (needs 2+ expert actors; E of them: every expert "
        "on two actors, so a decode step of one sequence runs one expert per actor)",
    )  # fmt: skip
    serve.add_argument(
        "--expert-threads", type=int, default=1, metavar="N",
        help="with --expert-actors 0: CPU threads that share each layer's experts out, one torch thread each; the "
        "server then asks Ray for N CPUs (default: 1)",
    )  # fmt: skip
    serve.add_argument(
        "--coordinator-cpus", type=int, default=1, metavar="N",
        help="CPUs each coordinator replica asks Ray for, and the torch threads its attention and routers run on "
        "(default: 1)",
    )  # fmt: skip
    serve.add_argument(
        "--lm-head-threads", type=int, default=None, metavar="N",
        help="on the CPU, torch threads of the LM head's product, which runs while the experts wait (default: every "
        "CPU of the coordinator's process; 1: its own threads)",
    )  # fmt: skip
    serve.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    serve.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 503")
    serve.add_argument(
        "--no-prefix-caching", action="store_true", help="prefill every prompt in full (default: share computed prefixes)"
    )
    serve.set_defaults(run=run_serve)


def _api_key(key: str | None, variable: str | None) -> str | None:
    if variable is None:
        return key
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"--api-key-env names {variable!r}, which is not set (or empty)")
    return key


def run_serve(args: argparse.Namespace) -> None:
    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    from moeshard.deploy.config import ServeArgs

    serve_args = ServeArgs(
        model_dir=args.model_dir,
        model_name=args.model_name,
        api_key=_api_key(args.api_key, args.api_key_env),
        public_docs=args.public_docs,
        public_metrics=args.public_metrics,
        expert_actors=args.expert_actors,
        coordinators=args.coordinators,
        device=args.device,
        dtype=args.dtype,
        ray_address=args.ray_address,
        max_waiting=args.max_waiting,
        engine={
            "cluster": {
                "transport": args.transport,
                "redundant_experts": args.redundant_experts,
                "coordinator_cpus": args.coordinator_cpus,
            },
            "enable_prefix_caching": not args.no_prefix_caching,
            "expert_threads": args.expert_threads,
            "lm_head_threads": args.lm_head_threads,
            "quantization": args.quantization,
            "batch_invariant": args.batch_invariant,
        },
    )
    config = serve_args.engine_config()  # validates everything before Ray starts

    import ray
    from ray import serve

    from moeshard.actors.ray_init import connect_ray
    from moeshard.deploy.app import build_app

    connect_ray(config)
    logging.getLogger("ray.serve").addFilter(_DropReconnectNotice())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(serve_args.model_dump()), name="moeshard", route_prefix="/")
    print(f"moeshard: serving {serve_args.served_model_name!r} at http://{args.host}:{args.port}/v1", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if config.cluster.pool_name is not None:  # on a cluster that outlives this command, the shared pool must go too
            from moeshard.actors.pool.service import stop_expert_pool

            stop_expert_pool(config.cluster.pool_name)
        ray.shutdown()
