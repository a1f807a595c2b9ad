"""Child processes of a launcher: started with spawn semantics, logged to files, always ended.

A child is a fresh `python -m tinyps ...` (never a fork of a process that has imported gRPC),
with its own share of the cores and its output in its own log file. It also asks the kernel
to end it if the launcher dies, so that not even a SIGKILLed launcher leaves it behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ps.security import TOKEN_ENV

__all__ = ["TOKEN_ENV", "Child", "die_with_parent", "end_all", "start_child", "thread_env"]

PARENT_ENV = "TINYPS_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Child:
    name: str  # "server0", "worker1", ...
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last lines of the child's log, for an error message."""
        try:
            with self.log.open(encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""


def thread_env(processes: int) -> dict[str, str]:
    """Thread counts that give each of `processes` processes its share of the cores."""
    share = str(max(1, (os.cpu_count() or 1) // processes))
    return {"NUMBA_NUM_THREADS": share, "OMP_NUM_THREADS": share,
            "OPENBLAS_NUM_THREADS": share, "MKL_NUM_THREADS": share}


def start_child(name: str, args: list[str], log: Path, env: dict[str, str],
                settings: str | None = None) -> Child:
    """Start `python -m tinyps ARGS` with its output in `log`, and `settings` (its settings
    as JSON, for `--settings -`) on its standard input."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ, **env, **{PARENT_ENV: str(os.getpid())})
    with log.open("ab") as out:
        # A process group of its own: a Ctrl-C at the terminal reaches the launcher alone,
        # which then takes the model from the servers before it ends them (end_all).
        proc = subprocess.Popen([sys.executable, "-m", "tinyps", *args], stdout=out,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL if settings is None else subprocess.PIPE,
                                env=child_env, process_group=0)
    if settings is not None:
        # A few KiB, less than a pipe holds: the write never waits for the child. A child
        # that died at once shows as a dead child, not as an error here.
        try:
            proc.stdin.write(settings.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
    return Child(name, proc, log)


def end_all(children: list[Child], grace_s: float = 5.0) -> None:
    """SIGTERM every live child, wait up to grace_s for all of them, then SIGKILL the rest."""
    for child in children:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5.0)  # SIGKILL cannot be refused: only a dead kernel is slower


def die_with_parent() -> None:
    """In a child started by start_child: have Linux send SIGTERM when the launcher dies."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
