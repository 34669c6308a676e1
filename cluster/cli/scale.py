"""``moeshard scale``: grow or shrink a running server's expert pool.

New expert actors start and load their experts (on another node when that is where the cluster has room),
the coordinators switch their dispatch between two steps, and actors removed are stopped once drained.
Requests running meanwhile go on with unchanged outputs. Needs the API key when the server has one.
"""

from __future__ import annotations

import argparse

from moeshard.cluster.cli.server_flags import add_server_arguments, exits_on_client_error, fail
from moeshard.cluster.client import Client

SCALE_TIMEOUT_S = 900.0  # starting actors on a new node may take minutes (the weights are read there)


def add_scale_command(commands) -> None:
    scale = commands.add_parser(
        "scale",
        help="grow or shrink a running server's expert pool",
        description="Set the number of expert actors of a running moeshard server while it serves (POST /v1/experts/scale).",
    )
    add_server_arguments(scale)
    scale.add_argument("--expert-actors", type=int, required=True, help="the number of expert actors the pool should have")
    scale.set_defaults(run=run_scale, timeout=SCALE_TIMEOUT_S)


@exits_on_client_error
def run_scale(args: argparse.Namespace) -> None:
    if args.expert_actors < 1:
        fail(f"--expert-actors must be at least 1, got {args.expert_actors}")
    # No retries: a scaling that could not place its actors has already waited the pool's startup timeout.
    with Client(args.url, args.api_key, timeout=args.timeout, max_retries=0) as client:
        report = client.scale(args.expert_actors)
    if report.expert_actors == report.expert_actors_before:
        print(f"the pool already has {report.expert_actors} expert actors")
        return
    change = f"started {report.started}" if report.started else f"stopped {report.stopped}"
    lagged = "" if report.switched else " (a coordinator had not switched yet)"
    print(
        f"expert actors {report.expert_actors_before} -> {report.expert_actors} in {report.seconds:.1f}s: {change}, "
        f"{report.moved} expert replicas moved, placement version {report.version}{lagged}"
    )
