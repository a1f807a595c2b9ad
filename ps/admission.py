"""Admission: what a server takes on. A layout within its memory budget (ps/budget.py), and
each worker's calls that may wait, up to its share of the handler threads.

State only, with no lock of its own: the store calls it with its lock held.
"""

from __future__ import annotations

from collections.abc import Sequence

from ps.budget import budget_bytes, layout_bytes
from ps.keys import Key
from ps.store_errors import ResourceExhausted

__all__ = ["Admission"]


class Admission:
    """The memory budget, and each worker's places for calls that may wait."""

    def __init__(self, memory_budget_mb: int | None, max_waiting: int, workers: int,
                 gathers: bool) -> None:
        self.budget = budget_bytes(memory_budget_mb)  # bytes an init may allocate
        self.max_waiting = max_waiting  # places per worker id
        self.workers = workers
        self.gathers = gathers  # sync: a layout also needs room for a gathered step
        self.waiting: dict[int, int] = {}  # worker -> its calls holding a place now

    def check_layout(self, layout: Sequence[Key], optimizer: str) -> None:
        """Refuse a layout that needs more than the budget, before anything is allocated."""
        need, what = layout_bytes(layout, optimizer, self.workers, self.gathers)
        if need > self.budget:
            raise ResourceExhausted(
                f"init: the layout needs {need} bytes ({what}), more than this server's "
                f"memory budget of {self.budget} bytes (--memory-budget-mb "
                f"{self.budget // 2**20}); nothing was allocated")

    def enter(self, worker: int) -> None:
        """Take one of `worker`'s places, or refuse the call at once when all are taken."""
        held = self.waiting.get(worker, 0)
        if held >= self.max_waiting:
            raise ResourceExhausted(
                f"worker {worker} already has {held} calls that may wait on this server, "
                f"the most one worker may (max_waiting {self.max_waiting}): this one is "
                f"refused")
        self.waiting[worker] = held + 1

    def leave(self, worker: int) -> None:
        self.waiting[worker] -= 1
