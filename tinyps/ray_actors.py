"""The Ray actors of a run: a parameter server, and a worker, each in an actor's process.

Each takes its settings as the dataclass itself (tinyps.roles), the token from its
environment, and does what `tinyps server` or `tinyps worker` does in a process of its own.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from dataclasses import replace
from pathlib import Path

import ray

from ps.checkpoint import list_checkpoints
from ps.memory import keep_freed_buffers
from ps.server import RunningServer, ServerConfig, serve
from tinyps import roles
from tinyps.rundir import Follower
from worker.process import WorkerSettings, run_worker_process

__all__ = ["ServerActor", "WorkerActor", "node_info"]

_STATE_FILE = "ray-actor.json"  # in a server's checkpoint folder: its port and start count


def node_info() -> dict:
    """The node and process an actor runs in, for the run's logs."""
    context = ray.get_runtime_context()
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
            "pid": os.getpid()}


# -- the actors -----------------------------------------------------------------------------


class ServerActor:
    """A parameter server in a Ray actor. Ray re-runs __init__ with the same arguments when
    it restarts the actor: then it restores its newest checkpoint and binds the port of its
    first start, read from its checkpoint folder (the placement group keeps it on the same
    node, so the folder and the address are the same ones)."""

    def __init__(self, config: ServerConfig, run: str, bind_node_ip: bool) -> None:
        keep_freed_buffers()  # the actor's process is a server's: see ps/memory.py
        config = roles.with_token_from_env(config)
        folder = config.checkpoint.directory
        folder.mkdir(parents=True, exist_ok=True)
        state_file = folder / _STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("run") == run:
            # Ray restarts an actor by running __init__ again with the same arguments: this
            # run's state file is already there.
            state["starts"] += 1
            config = replace(config, port=state["port"],
                             checkpoint=replace(config.checkpoint, restore=True))
        else:
            state = {"run": run, "starts": 1}
            if not config.checkpoint.restore:
                # The driver cleared its own node's folder; this node's may hold an earlier
                # run's checkpoints, which a restart would take for this run's.
                for path in list_checkpoints(folder):
                    path.unlink()
        if bind_node_ip:
            # The address Ray itself reaches this node on, so the other nodes can too.
            config = replace(config, host=ray.util.get_node_ip_address())
        self._config = config
        self._running: RunningServer = serve(config)
        state["port"] = self._running.port
        tmp = state_file.with_suffix(".tmp")  # whole or not at all, should we die writing
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(state_file)
        self._starts = state["starts"]

    def address(self) -> str:
        return self._running.address

    def settings(self) -> ServerConfig:
        """The settings this server runs with (the token restored from the environment)."""
        return self._config

    def starts(self) -> int:
        """How many times this server has started: 1, plus one per restart by Ray."""
        return self._starts

    def wait_stopped(self, timeout: float) -> bool:
        """After the Shutdown call: wait until the final checkpoint is written."""
        return self._running.wait(timeout)

    def checkpoints_written(self) -> int:
        return self._running.checkpoints_written

    def where(self) -> dict:
        return {**node_info(), "address": self._running.address, "starts": self._starts}


class WorkerActor:
    """A worker in a Ray actor: run_worker_process in a thread, its step records going to a
    file on this node that the driver reads through poll(). Created before the servers'
    addresses are known, so that its start-up overlaps theirs; start() runs it."""

    def __init__(self, metrics: Path) -> None:
        keep_freed_buffers()  # the actor's process is a worker's: see ps/memory.py
        # A file, as the local backend's workers write: run_worker_process appends to it.
        self._metrics = metrics
        self._metrics.unlink(missing_ok=True)
        self._follower = Follower([self._metrics])
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._settings: WorkerSettings | None = None

    def start(self, settings: WorkerSettings) -> None:
        settings = replace(roles.with_token_from_env(settings), metrics=str(self._metrics))
        self._settings = settings
        self._thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self._thread.start()

    def _run(self, settings: WorkerSettings) -> None:
        try:
            run_worker_process(settings)
        except BaseException:  # reported to the driver, which fails the run with it
            self._error = traceback.format_exc()

    def settings(self) -> WorkerSettings | None:
        """The settings this worker runs with (None before start)."""
        return self._settings

    def poll(self) -> tuple[list[dict], bool, str | None]:
        """(new step records, finished, the error's traceback if it failed)."""
        finished = not self._thread.is_alive()  # read first: no record comes after it
        records = self._follower.poll()
        if finished:
            self.discard()
        return records, finished, self._error

    def discard(self) -> None:
        self._metrics.unlink(missing_ok=True)

    def where(self) -> dict:
        return node_info()


# -- the run --------------------------------------------------------------------------------
