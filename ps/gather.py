"""Gathering a sync step: each worker's gradient of one key's step, then one update from them.

A step is complete once every live worker has pushed it (with b backup workers, the first W-b);
its gradients then combine into their mean, median or trimmed mean, plus the trusted
aggregator's DP noise when asked. State lives in the store's keys; it calls this with its lock.
"""

from __future__ import annotations

import zlib
from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np

from kernels import aggregate_median, aggregate_trimmed_mean
from ps.keys import Key

__all__ = ["AGGREGATES", "Gather", "Step", "parse_aggregate"]

AGGREGATES = ("mean", "median", "trimmed_mean")  # trimmed_mean:F trims F of each end
_F32_LIMIT = float(np.finfo(np.float32).max) * (1 - 2.0**-20)  # below: surely finite


def parse_aggregate(text: str) -> tuple[str, float]:
    """"mean", "median" or "trimmed_mean:F" -> (rule, F); F is the fraction cut off each end."""
    name, _, arg = text.partition(":")
    if name not in AGGREGATES:
        raise ValueError(f"aggregate must be one of mean, median, trimmed_mean:F, got {text!r}")
    if name != "trimmed_mean":
        if arg:
            raise ValueError(f"aggregate {name} takes no argument, got {text!r}")
        return name, 0.0
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"aggregate trimmed_mean needs a fraction, as in trimmed_mean:0.25; "
                         f"got {text!r}") from None
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"aggregate {text!r}: the trimmed fraction must be in [0, 0.5), "
                         f"got {fraction}")
    return name, fraction


@dataclass
class Step:
    """What one step of one key has gathered so far."""

    # Each worker's gradient, in arrival order: the rules aggregate them, and the store's
    # GradientWatch compares each with the others'.
    grads: dict[int, np.ndarray] = field(default_factory=dict)
    workers: set[int] = field(default_factory=set)  # the workers whose pushes are in
    # The first worker that found inf or NaN: then nobody's gradient of the step is applied.
    skipped_by: int | None = None
    bound: float | None = 0.0  # at least max |g| over the gradients in (None: not known)

    def add(self, worker: int, grad: np.ndarray | None, owned: bool = False,
            bound: float | None = None) -> None:
        """Take `worker`'s gradient (None: it skipped the step), with a bound on its |g| if
        known. Unless `owned` (the store's to keep), a copy: the gradient may be a view of the
        request's bytes, gone after the call."""
        self.workers.add(worker)
        if grad is None:
            if self.skipped_by is None:
                self.skipped_by = worker
            self.grads.clear()
        elif self.skipped_by is None:
            self.grads[worker] = grad if owned else np.array(grad, np.float32, copy=True)
            self.bound = None if self.bound is None or bound is None else max(self.bound, bound)


class Gather:
    """sync's settings for a step: when it is complete, and how its gradients combine."""

    def __init__(self, aggregate: str = "mean", backup_workers: int = 0,
                 dp_noise_std: float = 0.0, dp_seed: int | None = None) -> None:
        self.rule, self.fraction = parse_aggregate(aggregate)
        self.backup_workers = backup_workers  # a step completes with the first W-b gradients
        self.dp_noise_std = dp_noise_std  # N(0, s^2) added to each step's sum of gradients
        self.dp_seed = dp_seed  # None: noise from the OS's entropy (secret, as privacy needs)

    def next_complete(self, pending: dict[int, Step], version: int, next_step: np.ndarray,
                      live: Set[int]) -> Step | None:
        """The key's step `version` (its next to apply), taken off `pending` if complete:
        enough live workers have pushed it, or none is still to come (every live worker has
        pushed it or is past it: one past it whose gradient is not in sent it to this server
        before a restart, and will not send it again). `next_step`: each worker's next step."""
        entry = pending.get(version)
        if entry is None:
            return None
        needed = max(1, len(live) - self.backup_workers)
        if (len(entry.workers & live) >= needed
                or all(w in entry.workers or next_step[w] > version for w in live)):
            del pending[version]
            return entry
        return None

    def combine(self, entry: Step, key: Key, version: int) -> np.ndarray:
        """One update from a complete step's gradients (a new array), noise added."""
        grads = list(entry.grads.values())
        if self.rule == "mean":
            total = grads[0] + grads[1] if len(grads) > 1 else grads[0].copy()
            for g in grads[2:]:  # summed in arrival order
                total += g
            update = np.divide(total, np.float32(len(grads)), out=total)
        elif self.rule == "median":
            update = aggregate_median(np.stack(grads))
        else:
            update = aggregate_trimmed_mean(np.stack(grads), self.fraction)
        if self.dp_noise_std:
            update += self._noise(key, version, len(entry.workers))
        return update

    def combined_bound(self, entry: Step) -> float | None:
        """At least max |update| of combine(entry), or None when not known: a mean, median or
        trimmed mean of values within G stays within G, but for float32's rounding (each of
        the n - 1 sums, and the division) and as long as no partial sum can overflow; noise
        has no bound."""
        n = len(entry.grads)
        if entry.bound is None or self.dp_noise_std or not n:
            return None
        widened = n * entry.bound * (1 + n * 2.0**-22)  # the largest partial sum, rounded
        return widened / n if widened <= _F32_LIMIT else None

    def _noise(self, key: Key, version: int, count: int) -> np.ndarray:
        """The trusted aggregator's noise for one step of one key, as the mean receives it
        (std s / count). Seeded: one generator per (key, step), so that a run repeats
        whatever order the keys complete in; unseeded: the OS's entropy."""
        seed = self.dp_seed
        rng = np.random.default_rng(
            None if seed is None else (seed, zlib.crc32(key.name.encode()), key.start, version))
        std = self.dp_noise_std / count
        return rng.normal(0.0, std, key.size).astype(np.float32)
