"""Membership: which workers the barriers wait for, and which have gone silent.

State only, with no lock and no waiting of its own: the store calls it with its lock held, and
acts on what it answers (a removed worker's steps may now complete; a rejoined one's clock moves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Membership"]


class Membership:
    """The live, rejoining and started workers, and when each was last heard from."""

    def __init__(self, workers: int, lease_s: float | None,
                 clock: Callable[[], float]) -> None:
        # Barriers wait for the live workers. A removed worker (dead, or its lease expired)
        # and, after a restore, every worker, "rejoins": its next call may move its clock
        # forward to wherever it is now, since the store has lost track of it.
        self.workers = workers  # numbered 0..workers-1
        self.live: set[int] = set(range(workers))
        self.rejoining: set[int] = set()
        self.started: set[int] = set()  # workers that have asked for step 0
        # worker -> when its last call ended. A worker that has never called has no lease to
        # lose: the start line waits for it (a launcher that sees it die says so: Leave).
        self.last_seen: dict[int, float] = {}
        self.in_flight: dict[int, int] = {}  # worker -> its calls inside the store now
        self.lease_s = lease_s  # a live worker silent this long, no call in flight, is removed
        self._clock = clock  # seconds; tests pass a clock they move by hand

    # -- the start line: a run begins when every live worker has asked for step 0 -------------

    def start(self, worker: int) -> None:
        self.started.add(worker)

    def all_started(self) -> bool:
        return self.live <= self.started

    def not_started(self) -> list[int]:
        return sorted(self.live - self.started)

    # -- leaving and coming back --------------------------------------------------------------

    def remove(self, worker: int) -> bool:
        """Stop waiting for `worker`; it rejoins when it calls again. False if it was not live."""
        if worker not in self.live:
            return False
        self.live.discard(worker)
        self.rejoining.add(worker)
        return True

    def rejoin(self, worker: int) -> bool:
        """A call of `worker`: if it was rejoining, it is live (and started) again: True."""
        if worker not in self.rejoining:
            return False
        self.rejoining.discard(worker)
        self.live.add(worker)
        self.started.add(worker)
        return True

    def restored(self) -> None:
        """After a restore every worker has started, and rejoins: the store has lost track
        of how far each has got. Each holds a fresh lease."""
        workers = range(self.workers)
        self.started = set(workers)
        self.rejoining = set(workers)
        self.last_seen = dict.fromkeys(workers, self._clock())

    # -- leases -------------------------------------------------------------------------------

    @contextmanager
    def calling(self, worker: int) -> Iterator[None]:
        """Mark a call of `worker` in progress: a worker waiting on a barrier is not silent."""
        self.in_flight[worker] = self.in_flight.get(worker, 0) + 1
        try:
            yield
        finally:
            self.in_flight[worker] -= 1
            self.last_seen[worker] = self._clock()

    def silent(self) -> list[int]:
        """The live workers whose lease has expired: none of their calls is in flight, and
        the last one ended more than lease_s ago. The store removes them."""
        if self.lease_s is None:
            return []
        now = self._clock()
        return [w for w in sorted(self.live)
                if not self.in_flight.get(w) and w in self.last_seen
                and now - self.last_seen[w] > self.lease_s]
