"""The servers' health, watched from a thread of the launcher: a frozen server is one whose
standard gRPC health check has not answered for a whole `freeze_timeout_s`.

Each round asks every server at once, each with a short deadline, and reads the counters of
those that answered (a checkpoint write that failed is a fault event). The supervisor's loop
only reads what the watch found: a server that does not answer never stalls it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ps.client import PSClient, PSError, wait_healthy
from ps.security import TLSFiles

__all__ = ["HealthWatch"]


@dataclass
class HealthWatch:
    """Asks each server's health every `every_s`, each check within `deadline_s`."""

    addresses: list[str]
    token: str | None = None
    tls: TLSFiles | None = None
    every_s: float = 1.0
    deadline_s: float = 1.0
    _last_ok: list[float] = field(default_factory=list)
    _failures: list[int] = field(default_factory=list)  # checkpoint failures reported so far
    _events: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        now = time.monotonic()
        self._last_ok = [now] * len(self.addresses)
        self._failures = [0] * len(self.addresses)

    def start(self) -> HealthWatch:
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.deadline_s * 2 + self.every_s + 5)

    def silent_for(self) -> list[float]:
        """Seconds since each server last answered its health check (or since its grace
        after a restart ended)."""
        now = time.monotonic()
        with self._lock:
            return [max(0.0, now - t) for t in self._last_ok]

    def reset(self, index: int, grace_s: float = 0.0) -> None:
        """Server `index` was started again: its silence starts over, `grace_s` from now (a
        server that a backend restarts by itself needs time to come back)."""
        with self._lock:
            self._last_ok[index] = time.monotonic() + grace_s

    def take_events(self) -> list[str]:
        """Fault events found since the last call (failed checkpoint writes)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def check_stats(self, index: int, stats: dict) -> None:
        """Note a server's counters: a checkpoint write that failed since the last look is
        an event. (The fields are new; a server without them reports none.)"""
        failures = int(stats.get("checkpoint_failures", 0) or 0)
        with self._lock:
            if failures > self._failures[index]:
                error = stats.get("checkpoint_error", "") or "no reason given"
                self._events.append(f"server{index}: checkpoint write failed ({failures} in "
                                    f"all): {error}")
            self._failures[index] = max(failures, self._failures[index])

    def _run(self) -> None:
        clients = [PSClient([a], token=self.token, tls=self.tls, deadline_s=self.deadline_s,
                            retry_s=self.deadline_s) for a in self.addresses]
        # One thread per server, so that a silent server costs its deadline and no more.
        pool = ThreadPoolExecutor(max_workers=len(self.addresses),
                                  thread_name_prefix="health-check")
        try:
            while not self._stop.is_set():
                for i in self._round(pool):
                    if self._stop.is_set():
                        break
                    self._stats(i, clients[i])
                self._stop.wait(self.every_s)  # the watch's interval, not synchronisation
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            for client in clients:
                client.close()

    def _round(self, pool: ThreadPoolExecutor) -> list[int]:
        """Ask every server at once (a fresh channel each: one that saw the server die would
        wait out gRPC's reconnect backoff); the ones that answered SERVING in time."""
        try:
            checks = [pool.submit(wait_healthy, [a], self.deadline_s, self.tls)
                      for a in self.addresses]
        except RuntimeError:  # the interpreter is exiting: its pools take no more work
            self._stop.set()
            return []
        answered = []
        for i, check in enumerate(checks):
            try:  # wait_healthy keeps to its deadline; this one only guards against a bug
                answered_now = not check.result(timeout=self.deadline_s + 5)
            except TimeoutError:
                answered_now = False
            if answered_now:  # no address left unhealthy: it answered
                answered.append(i)
                with self._lock:
                    self._last_ok[i] = time.monotonic()  # also ends a restart's grace
        return answered

    def _stats(self, index: int, client: PSClient) -> None:
        try:
            stats = client.stats()[0]
        except (PSError, OSError):
            return  # the health check decides what silence means
        self.check_stats(index, stats)
