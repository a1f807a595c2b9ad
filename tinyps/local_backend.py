"""The local backend: every server and worker a process on this machine.

Each child is `python -m tinyps server|worker --settings -`, its settings given whole as JSON
on its standard input (the token in its environment), its output in logs/. A server writes
its address to a ready file once it listens; a worker appends its steps to metrics/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from ps.checkpoint import latest_checkpoint, server_directory
from ps.client import wait_healthy
from ps.security import TOKEN_ENV
from tinyps import roles
from tinyps.config import LaunchConfig
from tinyps.plan import LaunchError, LaunchPlan
from tinyps.processes import Child, end_all, start_child, thread_env
from tinyps.rundir import Follower
from tinyps.supervisor import Backend, WorkerNews

__all__ = ["LocalBackend", "start_servers"]

_POLL_S = 0.05  # how often the launcher looks at its children and their files


def _child_env(config: LaunchConfig) -> dict[str, str]:
    """Thread shares, and the token: in the environment, never on a command line (which
    `ps` shows to every user of the machine) or in a file."""
    env = thread_env(config.servers + config.workers)
    if config.security.token:
        env[TOKEN_ENV] = config.security.token
    return env


def _start_server(config: LaunchConfig, run_dir: Path, index: int, checkpoints: Path | None,
                  port: int = 0, restore: bool = False) -> tuple[Child, Path]:
    ready_file = run_dir / f"server{index}.address"
    ready_file.unlink(missing_ok=True)
    settings = roles.server_config(config, index, port=port, checkpoints=checkpoints,
                                   restore=restore)
    child = start_child(f"server{index}", ["server", "--settings", "-", "--ready-file",
                                           str(ready_file)],
                        run_dir / "logs" / f"server{index}.log", _child_env(config),
                        settings=roles.to_json(roles.without_secrets(settings)))
    return child, ready_file


def _wait_ready(children: list[Child], ready_files: list[Path], timeout: float) -> list[str]:
    """Addresses the servers wrote once listening; fails fast if one of them exits."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            if not child.alive():
                raise LaunchError(f"{child.name} exited with code {child.proc.returncode} "
                                  f"before it was ready; its log ends:\n{child.tail()}")
        if all(f.exists() for f in ready_files):
            return [f.read_text().strip() for f in ready_files]
        if time.monotonic() > deadline:
            raise LaunchError(f"servers not ready after {timeout:.0f} s")
        time.sleep(_POLL_S)  # polling the files the servers write, with a deadline


def _healthy(config: LaunchConfig, children: list[Child], ready: list[Path]) -> list[str]:
    addresses = _wait_ready(children, ready, config.startup_timeout_s)
    unhealthy = wait_healthy(addresses, config.startup_timeout_s, config.tls(client=True))
    if unhealthy:
        raise LaunchError(f"servers not serving: {', '.join(unhealthy)}")
    return addresses


def start_servers(config: LaunchConfig, run_dir: Path, checkpoints: Path | None = None,
                  restore: bool = False) -> tuple[list[Child], list[str]]:
    """Start the servers of a run and wait until each is healthy: (children, addresses)."""
    children, ready = [], []
    try:
        for i in range(config.servers):
            child, ready_file = _start_server(config, run_dir, i, checkpoints, restore=restore)
            children.append(child)
            ready.append(ready_file)
        return children, _healthy(config, children, ready)
    except BaseException:
        end_all(children)
        raise


class LocalBackend(Backend):
    """The processes of one run on this machine."""

    poll_s = _POLL_S

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.config = plan.config
        self.servers: list[Child] = []
        self.addresses: list[str] = []
        self.workers: list[Child | None] = [None] * self.config.workers
        self._follower = Follower([self._metrics(i) for i in range(self.config.workers)])
        self._restarted = 0

    def _metrics(self, index: int) -> Path:
        return self.plan.run_dir / "metrics" / f"worker{index}.jsonl"

    def start_servers(self, restore: bool) -> list[str]:
        self.servers, self.addresses = start_servers(self.config, self.plan.run_dir,
                                                     self.plan.checkpoints, restore)
        return self.addresses

    def start_worker(self, index: int) -> None:
        settings = roles.worker_settings(self.config, index, self.addresses,
                                         steps=self.plan.steps, metrics=self._metrics(index),
                                         start_time=self.plan.started)
        self.workers[index] = start_child(
            f"worker{index}", ["worker", "--settings", "-"],
            self.plan.run_dir / "logs" / f"worker{index}.log", _child_env(self.config),
            settings=roles.to_json(roles.without_secrets(settings)))

    def poll(self, running: set[int]) -> tuple[list[dict], list[WorkerNews]]:
        news = []
        for i in sorted(running):
            child = self.workers[i]
            code = child.proc.poll()
            if code == 0:
                news.append(WorkerNews(i, finished=True))
            elif code is not None and code < 0:
                news.append(WorkerNews(i, died=f"killed by signal {-code}"))
            elif code is not None:
                news.append(WorkerNews(i, failed=f"with exit code {code}; its log ends:\n"
                                                 f"{child.tail()}"))
        # Read after the exit codes: a worker that has ended has written its last line.
        return self._follower.poll(), news

    def dead_servers(self) -> list[int]:
        return [i for i, child in enumerate(self.servers) if not child.alive()]

    def server_death(self, index: int) -> str:
        dead = self.servers[index]
        return f"exited with code {dead.proc.returncode}; its log ends:\n{dead.tail()}"

    def restart_server(self, index: int) -> str:
        dead = self.servers[index]
        port = int(self.addresses[index].rsplit(":", 1)[1])
        child, ready = _start_server(self.config, self.plan.run_dir, index,
                                     self.plan.checkpoints, port=port, restore=True)
        self.servers[index] = child
        self._restarted += 1
        _healthy(self.config, [child], [ready])
        return (f"restarted {dead.name} (exit code {dead.proc.returncode}) on "
                f"{self.addresses[index]} from its checkpoint")

    def server_restarts(self) -> int:
        return self._restarted

    def end_frozen_server(self, index: int) -> None:
        child = self.servers[index]
        if child.alive():
            child.proc.kill()  # SIGKILL: a stopped process takes no other signal
            child.proc.wait(10.0)

    def kill(self, kind: str, index: int, done: int) -> str | None:
        child = (self.servers if kind == "server" else self.workers)[index]
        if child is None or not child.alive():
            return None
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
        return f"injected: SIGKILL to {child.name} after {done} steps"

    def end_worker(self, index: int) -> None:
        self.workers[index].proc.kill()
        self.workers[index].proc.wait()

    def wait_servers_stopped(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for child in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(max(0.0, deadline - time.monotonic()))
        return [i for i, child in enumerate(self.servers) if child.alive()]

    def checkpoints_written(self) -> int:
        # A server's newest checkpoint holds its total, restarts and the final one included.
        total = 0
        for i in range(self.config.servers):
            snapshot = latest_checkpoint(server_directory(self.plan.checkpoints, i))
            total += int(snapshot.counters.get("checkpoints_written", 0)) if snapshot else 0
        return total

    def close(self, grace_s: float = 5.0) -> None:
        end_all(self.servers + [w for w in self.workers if w is not None], grace_s)
