"""Wall-clock seconds per phase of a GSPO step (generation, rewards, old log-probs, update, backward+optimizer).

Why in the stage and not only in a benchmark: the step-cost breakdown is what tells whether rollouts or
updates dominate, and it must come from the code path that trains, not a re-implementation of it.
``benchmarks/gspo_step_cost.py`` reads these totals; the stage itself only accumulates them (a few
``perf_counter`` calls per step). On CUDA each phase boundary synchronises, so kernels are charged to the
phase that launched them. Each phase also records this process's CPU time (``time.process_time``): on a machine
shared with other jobs, wall time swings with their load, CPU time much less.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds and entry counts per named phase; phases may repeat, nesting is not expected."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to ``name``."""
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start
            self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        """Forget everything measured so far (e.g. after warm-up steps)."""
        self.seconds.clear()
        self.cpu_seconds.clear()
        self.calls.clear()
