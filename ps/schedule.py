"""Learning-rate schedules: the step size of a key's update as a pure function of its count.

Each follows a torch.optim.lr_scheduler class (closed forms of StepLR, CosineAnnealingLR,
LinearLR, and SequentialLR for a warmup); the servers call it with a key's version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["GRAMMAR", "Constant", "Cosine", "Schedule", "StepDecay", "Warmup", "check_fits",
           "parse_schedule"]

GRAMMAR = ("constant | step:EVERY:GAMMA | cosine[:T_MAX[:ETA_MIN]] | "
           "warmup:STEPS[:START][,THEN] (THEN one of the others), counted in updates of a key")


@dataclass(frozen=True)
class Constant:
    """The configured lr at every update (no scheduler)."""

    needs_total = False

    def lr(self, base: float, count: int, total: int | None = None) -> float:
        return base


@dataclass(frozen=True)
class StepDecay:
    """torch StepLR(step_size=every, gamma): lr * gamma ** (count // every)."""

    every: int
    gamma: float
    needs_total = False

    def lr(self, base: float, count: int, total: int | None = None) -> float:
        return base * self.gamma ** (count // self.every)


@dataclass(frozen=True)
class Cosine:
    """torch CosineAnnealingLR(T_max, eta_min), its closed form: from lr down to eta_min over
    T_max updates, then back up again as torch's does (a cosine of period 2*T_max). T_max
    None: the run's planned updates (`total`)."""

    t_max: int | None = None
    eta_min: float = 0.0

    @property
    def needs_total(self) -> bool:
        return self.t_max is None

    def lr(self, base: float, count: int, total: int | None = None) -> float:
        t_max = self.t_max if self.t_max is not None else total
        if t_max is None:
            raise ValueError("cosine without T_MAX needs the run's planned updates")
        t_max = max(1, t_max)  # a warmup as long as the run leaves no cosine to run
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * count / t_max)) / 2


@dataclass(frozen=True)
class Warmup:
    """torch SequentialLR([LinearLR(start_factor=start, total_iters=steps), then],
    milestones=[steps]): lr * start rising linearly to lr over `steps` updates, then `then`
    counted from 0 (with the updates left as its planned total)."""

    steps: int
    start: float
    then: Constant | StepDecay | Cosine = Constant()

    @property
    def needs_total(self) -> bool:
        return self.then.needs_total

    def lr(self, base: float, count: int, total: int | None = None) -> float:
        if count < self.steps:
            return base * (self.start + (1.0 - self.start) * count / self.steps)
        return self.then.lr(base, count - self.steps, None if total is None else total - self.steps)


Schedule = Constant | StepDecay | Cosine | Warmup


def _int(spec: str, what: str, text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--lr-schedule {spec!r}: {what} must be an integer, got {text!r}") \
            from None
    if value < least:
        raise ValueError(f"--lr-schedule {spec!r}: {what} must be >= {least}, got {value}")
    return value


def _float(spec: str, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--lr-schedule {spec!r}: {what} must be a number, got {text!r}") \
            from None
    if not math.isfinite(value):
        raise ValueError(f"--lr-schedule {spec!r}: {what} must be finite, got {text!r}")
    return value


def _plain(spec: str, text: str) -> Constant | StepDecay | Cosine:
    """One schedule without a warmup."""
    name, *args = text.split(":")
    if name == "constant" and not args:
        return Constant()
    if name == "step" and len(args) == 2:
        gamma = _float(spec, "step's GAMMA", args[1])
        if not gamma > 0:
            raise ValueError(f"--lr-schedule {spec!r}: step's GAMMA must be > 0, got {gamma:g}")
        return StepDecay(_int(spec, "step's EVERY", args[0], 1), gamma)
    if name == "cosine" and len(args) <= 2:
        t_max = _int(spec, "cosine's T_MAX", args[0], 1) if args and args[0] else None
        eta_min = _float(spec, "cosine's ETA_MIN", args[1]) if len(args) == 2 else 0.0
        if eta_min < 0:
            raise ValueError(f"--lr-schedule {spec!r}: cosine's ETA_MIN must be >= 0, got "
                             f"{eta_min:g}")
        return Cosine(t_max, eta_min)
    if name == "warmup":
        raise ValueError(f"--lr-schedule {spec!r}: a warmup comes first, and once")
    raise ValueError(f"--lr-schedule {spec!r}: expected {GRAMMAR}; {text!r} is none of them")


@lru_cache(maxsize=64)
def parse_schedule(spec: str | None) -> Schedule:
    """The schedule a `--lr-schedule` text names (None or "" : constant); ValueError naming the
    text and what is wrong with it. Cached: the servers ask once per update."""
    if spec is None or not spec.strip():
        return Constant()
    text = spec.strip()
    if not text.startswith("warmup:"):
        return _plain(spec, text)
    head, comma, rest = text.partition(",")
    args = head.split(":")[1:]
    if len(args) > 2 or (comma and not rest):
        raise ValueError(f"--lr-schedule {spec!r}: expected warmup:STEPS[:START][,THEN]")
    steps = _int(spec, "warmup's STEPS", args[0], 1)
    start = _float(spec, "warmup's START", args[1]) if len(args) == 2 else 1.0 / steps
    if not 0 < start <= 1:
        raise ValueError(f"--lr-schedule {spec!r}: warmup's START (a factor of lr) must be in "
                         f"(0, 1], got {start:g}")
    return Warmup(steps, start, _plain(spec, rest) if comma else Constant())


def check_fits(spec: str | None, total: int) -> None:
    """Refuse a schedule that a run of `total` updates per key cannot hold: a warmup as long
    as the run (it would never reach lr), with a cosine left nothing to anneal over."""
    schedule = parse_schedule(spec)
    if isinstance(schedule, Warmup) and schedule.steps >= total:
        raise ValueError(f"--lr-schedule {spec!r}: a warmup of {schedule.steps} updates is not "
                         f"shorter than the run's {total} updates per key")
