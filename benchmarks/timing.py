"""Side-by-side timing: two contenders measured in alternation in one process, as a ratio.

These machines are shared and noisy, so an absolute time means little; alternating the two
contenders round by round exposes both to the same noise, and the median ratio is what we keep.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Comparison", "compare", "table"]


@dataclass(frozen=True)
class Comparison:
    name: str
    ours: str  # what is being measured
    baseline: str  # what it is measured against
    ours_s: float  # median seconds per call
    baseline_s: float
    goal: float | None  # the speed-up the issue asks for, if any

    @property
    def speedup(self) -> float:
        """How many times faster ours is than the baseline (> 1 means faster)."""
        return self.baseline_s / self.ours_s

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.speedup >= self.goal

    def as_dict(self) -> dict:
        return {
            "name": self.name, "ours": self.ours, "baseline": self.baseline,
            "ours_s": self.ours_s, "baseline_s": self.baseline_s,
            "speedup": self.speedup, "goal": self.goal, "met": self.met,
        }


def _per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(
    name: str,
    ours: tuple[str, Callable[[], object]],
    baseline: tuple[str, Callable[[], object]],
    goal: float | None = None,
    rounds: int = 15,
    min_round_s: float = 0.02,
) -> Comparison:
    """Median seconds per call of each contender, rounds interleaved, after one warm-up call."""
    ours_label, ours_fn = ours
    base_label, base_fn = baseline
    ours_fn()  # compiles, faults in pages
    base_fn()
    # Enough calls per round that the timer's resolution and call overhead do not matter.
    single = max(_per_call(ours_fn, 1), _per_call(base_fn, 1), 1e-7)
    calls = max(1, int(min_round_s / single))
    ours_times, base_times = [], []
    for _ in range(rounds):
        ours_times.append(_per_call(ours_fn, calls))
        base_times.append(_per_call(base_fn, calls))
    return Comparison(
        name, ours_label, base_label,
        statistics.median(ours_times), statistics.median(base_times), goal,
    )


def table(title: str, runs: list[Comparison], baseline_column: bool = False) -> str:
    """The comparisons as aligned rows: time of each side, speedup, and the goal's verdict."""
    width = max(len(r.name) for r in runs)
    lines = [f"{title:<{width}}  {'ours':>10}  {'baseline':>10}  {'speedup':>8}  {'goal':<14}"
             + (" baseline" if baseline_column else "")]
    for r in runs:
        goal = "" if r.goal is None else f">={r.goal:.2f}x {'ok' if r.met else 'MISSED'}"
        lines.append(f"{r.name:<{width}}  {r.ours_s * 1e3:8.3f}ms  {r.baseline_s * 1e3:8.3f}ms  "
                     f"{r.speedup:7.2f}x  {goal:<14}"
                     + (f" {r.baseline}" if baseline_column else "").rstrip())
    return "\n".join(line.rstrip() for line in lines)
