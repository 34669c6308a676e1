"""Benchmarks of the expert-sharded data path (not tests): ``python -m moeshard.actors.benchmarks.dispatch`` and ``.granularity``."""
