"""StoreConfig: a server store's settings, each default commented and checked.

The consistency rule is named by `mode` and made by ps.consistency.make_rule; the settings of a
gathered sync step (aggregation, backup workers, server-side noise) are ps.gather's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ps.consistency import MODES, make_rule
from ps.gather import parse_aggregate

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    mode: str = "sync"  # "sync" | "async" | "ssp": the consistency rule (ps/consistency.py)
    workers: int = 1  # how many workers push; sync averages this many gradients per step
    staleness: int = 0  # ssp bound K, in clocks (steps)
    staleness_lr: bool = False  # async/ssp: divide the step size by the gradient's staleness
    max_staleness: int | None = None  # async/ssp: drop (and count) gradients staler than this
    backup_workers: int = 0  # sync: a step completes with the first W-b gradients
    aggregate: str = "mean"  # sync: mean | median | trimmed_mean:F (robust to bad workers)
    lease_s: float | None = None  # a worker silent this long (no call in flight) is removed
    # sync, DP-SGD with a trusted aggregator: N(0, s^2) noise added to the sum of each step's
    # gradients (so the mean gets s / count), once, instead of by every worker.
    dp_noise_std: float = 0.0
    dp_seed: int | None = None  # None: noise from the OS's entropy (secret, as privacy needs)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not 0 <= self.backup_workers < self.workers:
            raise ValueError(f"backup_workers must be in 0..{self.workers - 1} (fewer than the "
                             f"workers), got {self.backup_workers}")
        # Backup workers, robust aggregation and server-side noise act on a gathered step.
        gathers = make_rule(self.mode, self.staleness).gathers
        if self.backup_workers and not gathers:
            raise ValueError("backup_workers is for sync mode: async and ssp never wait for a "
                             "step's last gradient")
        name, _ = parse_aggregate(self.aggregate)
        if name != "mean" and not gathers:
            raise ValueError(f"aggregate {self.aggregate!r} is for sync mode: async and ssp "
                             f"apply each gradient alone")
        if self.lease_s is not None and not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if not (math.isfinite(self.dp_noise_std) and self.dp_noise_std >= 0):
            raise ValueError(f"dp_noise_std must be >= 0, got {self.dp_noise_std}")
        if self.dp_noise_std and not (gathers and name == "mean"):
            raise ValueError("server-side DP noise needs sync mode and mean aggregation: it is "
                             "added once to each step's sum of gradients")
