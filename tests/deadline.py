"""Waiting in tests without `time.sleep` as synchronisation: every wait has a deadline, and a
wait that runs out fails with what it was waiting for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
DEADLINE_S = 30.0


def wait_until(condition: Callable[[], object], what: str, deadline_s: float = DEADLINE_S,
               every_s: float = 0.01) -> None:
    """Poll condition() every `every_s` until it holds; fail naming `what` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"not in {deadline_s:g} s: {what}"
        threading.Event().wait(every_s)  # a polling interval, bounded by the deadline above


def in_thread(fn: Callable[[], T], deadline_s: float = DEADLINE_S) -> Callable[[], T]:
    """Start fn() in a daemon thread; return join(), which waits for it (with a deadline) and
    gives its result or raises its exception in the test's thread."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as err:  # handed to the test thread
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> T:
        thread.join(deadline_s)
        assert not thread.is_alive(), "the call did not return before the deadline"
        if "error" in out:
            raise out["error"]
        return out.get("result")

    return join
