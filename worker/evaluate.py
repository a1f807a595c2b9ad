"""Held-out evaluation during training: on which steps, and what one measurement records.

Worker 0 (and the single-process baseline) evaluates the weights it pulled for a step on the
test set every `eval_every` steps and at the last step; the time it takes is its own figure,
never compute or waiting, so that those shares stay honest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Params = dict[str, np.ndarray]


class Evaluates(Protocol):
    """A model, as evaluation needs it (worker.model.MLP is one)."""

    def evaluate(self, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, accuracy) over X, y."""

__all__ = ["HeldOut", "Measurement", "eval_interval"]


def eval_interval(eval_every: int | None, steps_per_epoch: int) -> int:
    """Steps between evaluations: `eval_every` as given (0: never), or for None once per
    epoch (`steps_per_epoch`, at least 1): a few evaluations per run, each a fraction of an
    epoch's time."""
    if eval_every is None:
        return max(1, steps_per_epoch)
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: off) or None, got {eval_every}")
    return eval_every


@dataclass(frozen=True)
class Measurement:
    """One held-out evaluation, as a step's metrics line carries it."""

    test_accuracy: float  # share of the test set classified right
    test_loss: float  # mean cross-entropy over the test set
    eval_s: float  # seconds the evaluation took

    def as_dict(self) -> dict[str, float]:
        return {"test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
                "eval_s": self.eval_s}


@dataclass(frozen=True)
class HeldOut:
    """The test set, and how often to evaluate on it (every `every` steps; 0: never)."""

    X: np.ndarray
    y: np.ndarray
    every: int

    def __post_init__(self) -> None:
        if len(self.X) == 0 or len(self.X) != len(self.y):
            raise ValueError(f"the held-out set needs as many labels as rows (at least one), "
                             f"got {len(self.X)} rows and {len(self.y)} labels")
        if self.every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: off), got {self.every}")

    def due(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` (0-based) is evaluated: every `every`-th from step 0
        (the weights before any update: chance), and the last."""
        return self.every > 0 and (step % self.every == 0 or step == steps - 1)

    def measure(self, model: Evaluates, params: Params) -> Measurement:
        """Evaluate `params` on the held-out set, in fp32, timed."""
        began = time.monotonic()
        loss, accuracy = model.evaluate(params, self.X, self.y)
        return Measurement(float(accuracy), float(loss), time.monotonic() - began)
