"""Expert threads: a layer's experts run on several CPU threads at once, one torch thread each.

On the CPU a decode step's expert products are bound by reading the experts' weights, and one thread reads
them at about half the rate the memory gives (docs/performance.md, "Expert threads"). Splitting each
product over torch's intra-op threads is no remedy in a server: every small op then waits for all of its
threads, and the server's event loop preempts one of them. Here the experts are shared out instead: each of
``count`` threads (the caller and ``count - 1`` workers) runs whole experts, every product on one torch
thread. Each expert computes exactly what it computes alone, into rows of its own, so the output is the
same bit for bit whatever the count.

Only the torch path takes them (the CPU); a GPU's grouped kernel runs every expert in one launch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class ExpertThreads:
    """``count`` threads for a layer's experts: ``map`` shares tasks out between the caller and the workers."""

    def __init__(self, count: int):
        if count < 2:
            raise ValueError(f"expert threads need a count of at least 2, got {count}")
        self.count = count
        self._workers = ThreadPoolExecutor(
            count - 1, thread_name_prefix="moeshard-experts", initializer=torch.set_num_threads, initargs=(1,)
        )

    def map(self, tasks: Sequence[Callable[[], Result]]) -> list[Result]:
        """Run every task (the caller takes the first share, the workers the rest, in contiguous shares of
        equal size) under the caller's grad and inference modes -> their results, in the tasks' order."""
        if len(tasks) < 2:
            return [task() for task in tasks]
        shares = _shares(len(tasks), self.count)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run_share(share: range) -> list[Result]:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return [tasks[i]() for i in share]

        pending = [self._workers.submit(run_share, share) for share in shares[1:]]
        try:
            results = [tasks[i]() for i in shares[0]]
        finally:
            done = [future.result() for future in pending]  # waits for every share, even when the caller's failed
        for share in done:
            results.extend(share)
        return results

    def close(self) -> None:
        self._workers.shutdown(wait=True)


def run_tasks(tasks: Sequence[Callable[[], Result]], threads: ExpertThreads | None) -> list[Result]:
    """Every task's result in order: shared out over ``threads``, or one after another here when None."""
    return threads.map(tasks) if threads is not None else [task() for task in tasks]


def _shares(num_tasks: int, count: int) -> list[range]:
    """Tasks 0..num_tasks-1 cut into at most ``count`` contiguous ranges whose sizes differ by one at most."""
    parts = min(count, num_tasks)
    bounds = [num_tasks * p // parts for p in range(parts + 1)]
    return [range(start, end) for start, end in zip(bounds[:-1], bounds[1:])]
