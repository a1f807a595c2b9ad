"""StoreConfig: a server store's settings, each default commented and checked.

The consistency rule is named by `mode` and made by ps.consistency.make_rule; the settings of a
gathered sync step (aggregation, backup workers, server-side noise) are ps.gather's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ps.consistency import MODES, make_rule
from ps.gather import parse_aggregate
from ps.settings import setting

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    """How a server's store treats the workers' pushes and pulls."""

    mode: str = setting("sync", "sync: a barrier per step; async: apply on arrival; ssp: "
                                "bounded staleness (ps/consistency.py)", choices=MODES)
    workers: int = setting(1, "how many workers push: a sync step waits for all of them")
    staleness: int = setting(0, "ssp's bound K: no worker more than K steps ahead of the "
                                "slowest")
    staleness_lr: bool = setting(False, "async/ssp: divide each step by its gradient's "
                                        "staleness (Zhang et al. 2016)")
    max_staleness: int | None = setting(
        None, "async/ssp: drop gradients staler than this (counted)")
    backup_workers: int = setting(0, "sync: each step takes the first W-b gradients and drops "
                                     "the late ones (Chen et al. 2016)")
    aggregate: str = setting("mean", "sync: mean | median | trimmed_mean:F (F cut from each "
                                     "end), the last two robust to Byzantine workers")
    # A worker silent this long (no call in flight) is removed from the barriers; None: never.
    lease_s: float | None = setting(30.0, "seconds a worker may stay silent before barriers "
                                          "stop waiting for it", flag="--lease", metavar="SECONDS")
    # sync, DP-SGD with a trusted aggregator: N(0, s^2) noise added to the sum of each step's
    # gradients (so the mean gets s / count), once, instead of by every worker.
    dp_noise_std: float = setting(0.0, "sync: add N(0, s^2) to each step's sum of gradients "
                                       "(DP-SGD noise from a trusted aggregator)")
    dp_seed: int | None = setting(None, "seed that noise (default: secret OS entropy)")
    # An Init whose layout needs more (values, optimizer state, sync's gathered gradients; see
    # ps/budget.py) is refused with RESOURCE_EXHAUSTED before anything is allocated.
    memory_budget_mb: int | None = setting(
        None, "MiB this server may hold for its parameters, optimizer state and gathered "
              "gradients; an Init that needs more is refused (default: half of this "
              "machine's physical memory)", metavar="MIB")
    # A real worker has at most a few chunks in flight to one server: PSClient runs 4 calls
    # per server at once (in_flight), and its pool may put all 4*S of S servers' on one; 32
    # covers 8 servers. Waiting calls hold a handler thread each, so the server's pool is
    # sized from this bound (ps/server.py).
    max_waiting: int = setting(
        32, "calls one worker id may have waiting at once (pulls at a barrier, PushPulls); "
            "one more is refused with RESOURCE_EXHAUSTED, so that no client can hold every "
            "handler thread")

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
        rule = make_rule(self.mode, self.staleness)
        gathers = rule.gathers
        if self.staleness and (gathers or not rule.waits):  # only ssp waits step by step alone
            raise ValueError(f"staleness (the ssp bound) is for --mode ssp, not {self.mode}")
        if gathers and (self.staleness_lr or self.max_staleness is not None):
            raise ValueError("staleness_lr and max_staleness are for async and ssp: sync has no "
                             "stale gradients")
        if self.backup_workers and not gathers:
            raise ValueError(f"backup_workers ({self.backup_workers}) is for --mode sync: "
                             f"async and ssp never wait for a step's last gradient")
        name, _ = parse_aggregate(self.aggregate)
        if name != "mean" and not gathers:
            raise ValueError(f"--aggregate {self.aggregate} is for --mode sync: async and ssp "
                             f"apply each gradient alone")
        if self.lease_s is not None and not (self.lease_s > 0 and math.isfinite(self.lease_s)):
            raise ValueError(f"lease_s must be > 0 and finite (seconds), got {self.lease_s}")
        if not (math.isfinite(self.dp_noise_std) and self.dp_noise_std >= 0):
            raise ValueError(f"dp_noise_std must be >= 0, got {self.dp_noise_std}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0 (MiB), or None for half of the "
                             f"machine's memory; got {self.memory_budget_mb}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.dp_noise_std and not (gathers and name == "mean"):
            raise ValueError("server-side DP noise needs sync mode and mean aggregation: it is "
                             "added once to each step's sum of gradients")
