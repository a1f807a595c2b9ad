"""A shard's state as plain arrays: what a checkpoint holds and a restarted server restores.

The store takes a Snapshot under its lock and restores one; ps.checkpoint writes and reads
them as files. Neither side needs the other: a Snapshot is only data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ps.keys import Key
from ps.optimizer import OptimizerConfig

__all__ = ["KeyState", "Snapshot"]


@dataclass
class KeyState:
    """One key: its values, version, per-worker clocks and optimizer state."""

    key: Key
    value: np.ndarray  # float32 (key.size,)
    version: int  # updates applied to this key
    clocks: np.ndarray  # int64 (workers,): the next step each worker must push for this key
    # The optimizer's state of this key: {} for sgd, {"buf"} for momentum, {"m", "v", "step"}
    # for adam and adamw; arrays are float32 (key.size,), "step" is an int.
    optimizer: dict[str, np.ndarray | int] = field(default_factory=dict)


@dataclass
class Snapshot:
    """A server's shard at one moment."""

    mode: str  # the consistency mode it ran in
    workers: int
    optimizer: OptimizerConfig
    keys: list[KeyState]
    # Store counters (updates, pushes, ...; the staleness histogram as a list) carried across
    # a restart, so that a run's totals do not restart at zero with the server.
    counters: dict[str, int | list[int]] = field(default_factory=dict)
    seq: int = 0  # which checkpoint this is: the shard's min version when it was taken
