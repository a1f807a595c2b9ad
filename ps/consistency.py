"""Consistency rules: when a pull may be answered, and what an arriving gradient does.

One class per mode (sync, async, ssp), each answering the same few questions, so that a mode
reads top to bottom in one place, as Petuum Bösen's consistency controllers do. A rule keeps no
state: it is handed the keys it governs and the live workers, so that each table could one day
have its own. The store asks its rule; `make_rule` is the one place that reads a mode string.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Set
from enum import Enum
from typing import Protocol

import numpy as np

__all__ = [
    "EVERY_WORKER", "MODES", "Arrival", "AsyncRule", "Clocked", "Rule", "SSPRule", "SyncRule",
    "clock", "make_rule", "slowest_clock",
]

MODES = ("sync", "async", "ssp")
EVERY_WORKER = -1  # the worker in the mark of a step skipped for all of them


class Clocked(Protocol):
    """What a rule reads of one key: the updates applied to it, and each worker's next step."""

    version: int
    next_step: np.ndarray  # int64 (workers,)


def clock(worker: int, keys: Collection[Clocked]) -> int:
    """`worker`'s clock over `keys`: the steps of it that every one of them has received."""
    return min(int(k.next_step[worker]) for k in keys)


def slowest_clock(keys: Collection[Clocked], live: Set[int]) -> float:
    """The slowest live worker's clock over `keys` (inf when none is live: nobody holds back)."""
    return min((clock(w, keys) for w in live), default=math.inf)


class Arrival(Enum):
    """What becomes of a checked gradient of one key when it arrives."""

    APPLY = "apply"  # applied at once, alone
    GATHER = "gather"  # gathered into its step, which is applied whole once complete
    LATE = "late"  # its step was applied without it: dropped, and counted


class Rule(ABC):
    """The questions every rule answers. `keys`: the keys a call concerns (their versions and
    clocks); `live`: the workers that barriers wait for (see ps/membership.py)."""

    name: str  # the mode it implements, spelled as StoreConfig and checkpoints spell it
    gathers: bool  # a step's gradients become one update (aggregation, backup workers, noise)
    waits: bool  # a pull of step t may wait, and t must be within the worker's own clock

    @abstractmethod
    def ready(self, step: int, keys: Collection[Clocked], live: Set[int]) -> bool:
        """Whether a pull of `step` (the step its worker is about to compute) may be answered."""

    @abstractmethod
    def start_step(self, worker: int, keys: Collection[Clocked], live: Set[int]) -> int:
        """The step a starting or rejoining `worker` begins at."""

    @abstractmethod
    def arrival(self, step: int, version: int) -> Arrival:
        """What a gradient of `step` does, arriving at a key at `version`."""

    @abstractmethod
    def snapshot_clocks(self, key: Clocked) -> np.ndarray:
        """The clocks that a checkpoint records for `key` (a new array)."""

    @abstractmethod
    def skip_mark(self, worker: int, step: int) -> tuple[int, int]:
        """How `worker`'s `step`, skipped for inf or NaN, is recorded and then looked up."""

    def updates_per_step(self, workers: int) -> int:
        """The updates a key takes per worker step: one for a gathered step, else one per
        worker's push (what a learning-rate schedule counts, see ps/schedule.py)."""
        return 1 if self.gathers else workers


class SyncRule(Rule):
    """Bulk synchronous: every live worker's gradient of step t is gathered and applied as one
    update, and only then are pulls for step t+1 answered. Like ssp with K=0, aggregated."""

    name, gathers, waits = "sync", True, True

    def ready(self, step: int, keys: Collection[Clocked], live: Set[int]) -> bool:
        # `step` updates applied to every key: steps 0..step-1 are complete (the live set and
        # the backup workers decided when; see ps/gather.py).
        return all(k.version >= step for k in keys)

    def start_step(self, worker: int, keys: Collection[Clocked], live: Set[int]) -> int:
        # The steps it missed were applied without it: it starts at the first one still open.
        return max(clock(worker, keys), min(k.version for k in keys))

    def arrival(self, step: int, version: int) -> Arrival:
        # A step before the version was applied without it (backup workers, a rejoin).
        return Arrival.LATE if step < version else Arrival.GATHER

    def snapshot_clocks(self, key: Clocked) -> np.ndarray:
        # A step still gathering is not kept (its partial sum is not state a restart can
        # trust): the clocks say so, and the workers push that step again.
        return np.minimum(key.next_step, key.version)

    def skip_mark(self, worker: int, step: int) -> tuple[int, int]:
        # One worker's inf or NaN skips the step for everyone, so that all W workers and their
        # loss scalers stay in step.
        return (EVERY_WORKER, step)


class AsyncRule(Rule):
    """Asynchronous: each gradient is applied on arrival, and a pull returns the newest
    weights at once. Like ssp with K=infinity."""

    name, gathers, waits = "async", False, False

    def ready(self, step: int, keys: Collection[Clocked], live: Set[int]) -> bool:
        return True

    def start_step(self, worker: int, keys: Collection[Clocked], live: Set[int]) -> int:
        return clock(worker, keys)  # nobody waits for anybody: its own clock

    def arrival(self, step: int, version: int) -> Arrival:
        return Arrival.APPLY

    def snapshot_clocks(self, key: Clocked) -> np.ndarray:
        return key.next_step.copy()

    def skip_mark(self, worker: int, step: int) -> tuple[int, int]:
        return (worker, step)  # the others' steps are theirs


class SSPRule(Rule):
    """Stale synchronous parallel, bound K: each gradient is applied on arrival, but a worker
    at clock c may not start step c until the slowest live worker's clock is at least c-K."""

    name, gathers, waits = "ssp", False, True

    def __init__(self, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"ssp: staleness must be >= 0, got {staleness}")
        self.staleness = staleness  # K, in clocks (steps)

    def ready(self, step: int, keys: Collection[Clocked], live: Set[int]) -> bool:
        # Key by key: every live worker has pushed at least step - K steps of these keys.
        return slowest_clock(keys, live) >= step - self.staleness

    def start_step(self, worker: int, keys: Collection[Clocked], live: Set[int]) -> int:
        # Where the others are, if they are ahead: the steps it missed are theirs now.
        own = clock(worker, keys)
        return max(own, min((clock(w, keys) for w in live if w != worker), default=own))

    def arrival(self, step: int, version: int) -> Arrival:
        return Arrival.APPLY

    def snapshot_clocks(self, key: Clocked) -> np.ndarray:
        return key.next_step.copy()

    def skip_mark(self, worker: int, step: int) -> tuple[int, int]:
        return (worker, step)


def make_rule(mode: str, staleness: int = 0) -> Rule:
    """The rule of a mode string, "sync", "async" or "ssp"; `staleness` is ssp's K."""
    if mode == "sync":
        return SyncRule()
    if mode == "async":
        return AsyncRule()
    if mode == "ssp":
        return SSPRule(staleness)
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
