"""Benchmarks of the kernels (not tests): ``python -m moeshard.kernels.benchmarks.kernels`` and ``.linear``."""
