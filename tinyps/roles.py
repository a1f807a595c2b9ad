"""What each process of a run is told: a server's ServerConfig, a worker's WorkerSettings.

Both are made here, and only here, from the run's LaunchConfig: the parts travel whole, and
only what differs per process (an index, an address, a checkpoint folder, an injected fault)
is set. Every backend and a cluster spec hand their processes these objects, as JSON to a
child process (`to_json` / `from_json`) or as themselves to a Ray actor.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from ps.checkpoint import server_directory
from ps.security import TOKEN_ENV
from ps.server import CheckpointConfig, ServerConfig
from ps.settings import from_dict, to_dict
from tinyps.config import LaunchConfig
from worker.process import WorkerSettings

__all__ = ["from_json", "server_config", "to_json", "without_secrets", "worker_settings"]


def server_config(config: LaunchConfig, index: int, *, port: int = 0, host: str | None = None,
                  checkpoints: Path | None = None, restore: bool = False) -> ServerConfig:
    """Server `index` of the run: checkpoints, if given, go to its own folder of
    `checkpoints`; restore starts it from the newest one there."""
    checkpoint = CheckpointConfig()
    if checkpoints is not None:
        checkpoint = replace(config.checkpoint,
                             checkpoint_dir=str(server_directory(checkpoints, index)),
                             restore=restore)
    return ServerConfig(host=host or config.host, port=port, store=config.store,
                        checkpoint=checkpoint, security=config.security)


def worker_settings(config: LaunchConfig, index: int, addresses: list[str] | tuple[str, ...],
                    *, steps: int | None = None, metrics: Path | str | None = None,
                    start_time: float | None = None) -> WorkerSettings:
    """Worker `index` of the run (steps None: the config's epochs; metrics: where its step
    records go)."""
    train = config.train if steps is None else replace(config.train, steps=steps)
    return WorkerSettings(
        servers=tuple(addresses), index=index, workers=config.workers, train=train,
        split=config.split, placement=config.placement, precision=config.precision,
        privacy=config.privacy, security=config.security, transport=config.transport,
        slowdown=config.faults.slowdown(index),
        poison=config.faults.poison_of(index),
        metrics=None if metrics is None else str(metrics), start_time=start_time)


def without_secrets(settings: ServerConfig | WorkerSettings) -> ServerConfig | WorkerSettings:
    """The settings with the token taken out: it travels in the environment ($TINYPS_TOKEN),
    never in a file, a command line or a Ray task's arguments."""
    return replace(settings, security=replace(settings.security, token=None))


def with_token_from_env(settings: ServerConfig | WorkerSettings
                        ) -> ServerConfig | WorkerSettings:
    """In the process that runs them: the token back, from the environment."""
    token = os.environ.get(TOKEN_ENV) or None
    return replace(settings, security=replace(settings.security, token=token))


def to_json(settings: ServerConfig | WorkerSettings) -> str:
    """A process's settings, whole, as one line of JSON (no token)."""
    return json.dumps(to_dict(settings))


def from_json(kind: type, text: str, token: str | None) -> ServerConfig | WorkerSettings:
    """The settings a child process was given (`kind`: ServerConfig or WorkerSettings)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{kind.__name__} settings are not JSON: {err}") from None
    return from_dict(kind, data, token=token)
