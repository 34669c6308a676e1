"""The ``moeshard`` command line: generate, serve, chat, bench, routing, demo-model."""

from moeshard.cluster.cli.main import main

__all__ = ["main"]
