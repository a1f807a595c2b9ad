"""Watching the workers' gradients in sync mode, to flag a worker that stands apart.

Each step, per key, the server compares every worker's gradient with the mean of the other
workers' (leave-one-out, so that a worker does not vote for itself): the cosine between the
two, and the worker's norm against the step's median norm. A poisoned worker pushes
gradients that point elsewhere (label flipping) or are far larger or smaller (scaling); an
honest one, on data like the others', does not. Flags use robust statistics (median and
MAD over the workers), so that one bad worker cannot hide by moving the yardstick.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GradientWatch"]

_MIN_OBSERVATIONS = 20  # key-steps seen before a worker may be flagged
_Z = 3.5  # robust z-score beyond which a worker is flagged
# Floors on the spread: when honest workers agree closely, the MAD is tiny and any ripple
# would stand out; a worker is only flagged for a difference that matters.
_COSINE_FLOOR = 0.05
_LOG_NORM_FLOOR = math.log(1.25)


@dataclass
class _Seen:
    weight: float = 0.0  # elements seen (a key-step weighs its size)
    cosine: float = 0.0  # weighted sums
    log_norm_ratio: float = 0.0
    observations: int = 0


@dataclass
class GradientWatch:
    """Per-worker statistics of the gradients of completed sync steps."""

    seen: dict[int, _Seen] = field(default_factory=dict)

    def observe(self, grads: dict[int, np.ndarray]) -> None:
        """One key's gradients of one step, {worker: gradient}; needs two workers or more.

        Runs on every sync step under the store's lock, so it reads the data once per pair,
        as the dot products of the Gram matrix G, and does the rest on those W*W numbers:
        |x_i| = sqrt(G[i][i]); x_i . (sum of the others) is row i's sum without G[i][i];
        the others' squared norm is the sum of G without row and column i.
        """
        if len(grads) < 2:
            return
        workers = list(grads)
        g = _gram([grads[w] for w in workers])
        n = len(workers)
        norms = [math.sqrt(g[i][i]) for i in range(n)]
        median_norm = statistics.median(norms)
        size = grads[workers[0]].size
        total = sum(map(sum, g))
        for i, w in enumerate(workers):
            row = sum(g[i])
            dot = row - g[i][i]
            others_norm = math.sqrt(max(total - 2 * row + g[i][i], 0.0))
            denominator = norms[i] * others_norm
            cosine = dot / denominator if denominator > 0 else 0.0
            ratio = norms[i] / median_norm if median_norm > 0 else 1.0
            s = self.seen.setdefault(w, _Seen())
            s.weight += size
            s.cosine += size * cosine
            s.log_norm_ratio += size * math.log(max(ratio, 1e-12))
            s.observations += 1

    def summary(self) -> dict[int, tuple[float, float]]:
        """worker -> (mean cosine to the others, mean norm / median norm)."""
        return {w: (s.cosine / s.weight, math.exp(s.log_norm_ratio / s.weight))
                for w, s in sorted(self.seen.items()) if s.weight}

    def suspects(self) -> list[int]:
        """Workers whose cosine is far below the others' or whose norm is far from theirs."""
        stats = {w: (c, math.log(r)) for w, (c, r) in self.summary().items()
                 if self.seen[w].observations >= _MIN_OBSERVATIONS}
        if len(stats) < 3:  # with two workers, neither is "the others"
            return []
        cosines = np.array([c for c, _ in stats.values()])
        logs = np.array([r for _, r in stats.values()])
        flagged = []
        for w, (c, r) in stats.items():
            low_cosine = (np.median(cosines) - c) / _spread(cosines, _COSINE_FLOOR) > _Z
            odd_norm = abs(r - np.median(logs)) / _spread(logs, _LOG_NORM_FLOOR) > _Z
            if low_cosine or odd_norm:
                flagged.append(w)
        return flagged


def _spread(values: np.ndarray, floor: float) -> float:
    """The MAD, scaled to a normal's standard deviation, but at least `floor`."""
    mad = float(np.median(np.abs(values - np.median(values)))) * 1.4826
    return max(mad, floor)


def _gram(xs: list[np.ndarray]) -> list[list[float]]:
    """Dot products of every pair, as Python floats. BLAS in float32 is fast and, for a
    statistic, precise enough; a sum that overflows float32 is taken again in float64."""
    n = len(xs)
    g = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            with np.errstate(over="ignore"):  # caught below
                d = float(np.dot(xs[i], xs[j]))
            if not math.isfinite(d):
                d = float(np.dot(xs[i].astype(np.float64), xs[j].astype(np.float64)))
            g[i][j] = g[j][i] = d
    return g
