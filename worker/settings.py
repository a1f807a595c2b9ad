"""What a worker trains: the model and data, the optimizer, the schedule, the workers' shards.

One set of settings, with one set of defaults, for `tinyps launch`, `tinyps worker` and the
single-process baseline `tinyps train`, so that a baseline is like for like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ps.optimizer import OPTIMIZERS, OptimizerConfig
from ps.schedule import GRAMMAR, parse_schedule
from ps.settings import setting
from worker.model_spec import parse_spec
from worker.shards import PARTITION_SCHEMES

__all__ = ["SplitConfig", "TrainConfig", "parse_widths"]


def parse_widths(text: str) -> tuple[int, ...]:
    """"128" or "256,128" -> (256, 128)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected at least one width, got {text!r}")
    return values


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = setting("digits", "digits | synthetic | mnist:DIR | csv:PATH")
    hidden: tuple[int, ...] = setting(
        (128,), "hidden layer widths, comma separated (input and output come from the data)",
        parse=parse_widths)
    model: str | None = setting(
        None, "the model: mlp:W1,W2,... or cnn:C1,C2,...[/H1,...] (worker/model_spec.py); "
        "default: mlp: of --hidden", metavar="SPEC")
    epochs: int = setting(20, "passes of each worker over its shard (unless --steps is given)")
    steps: int | None = setting(None, "steps per worker; overrides --epochs")
    batch_size: int = setting(32, "examples per step, per worker")
    # A language model's loss is a mean over every token of its batch (millions, in large
    # runs), so each token's gradient is 1/tokens of its error: this emulates that divisor.
    loss_mean_over: int | None = setting(
        None, "divide each batch's summed loss by N instead of the batch size, as a loss "
              "averaged over N tokens does: the gradients are batch/N times as large (Adam "
              "barely notices; 16-bit formats do); the reported loss stays the batch mean",
        metavar="N")
    lr: float = setting(0.1, "step size")
    optimizer: str = setting("sgd", "the update rule, with PyTorch's semantics",
                             choices=OPTIMIZERS)
    momentum: float = setting(0.9, "for --optimizer momentum")
    weight_decay: float = setting(0.0, "L2 penalty added to each gradient, as PyTorch's "
                                       "(adamw: decoupled, weights *= 1 - lr x decay)")
    lr_schedule: str | None = setting(
        None, f"the step size by a key's update count, applied by the servers, as PyTorch's "
              f"schedulers: {GRAMMAR}; cosine's T_MAX defaults to the run's updates "
              f"(sync: the steps; async, ssp: workers x steps)", metavar="SPEC")
    augment: bool = setting(False, "random one-pixel shifts of image batches")
    eval_every: int | None = setting(
        None, "test-set accuracy and loss every N steps and at the last (worker 0 only; "
              "default: once per epoch of its shard; 0: off)")
    seed: int = setting(0, "fixes the model's start, the data split and the batch order")

    def __post_init__(self) -> None:
        hidden = (self.hidden,) if isinstance(self.hidden, int) else self.hidden
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss_mean_over is not None and self.loss_mean_over < 1:
            raise ValueError(f"loss_mean_over must be >= 1, got {self.loss_mean_over}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: off), got {self.eval_every}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.model is not None:
            parse_spec(self.model)  # the grammar now; what fits the data, once it is loaded
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        parse_schedule(self.lr_schedule)  # a bad spec is refused now, naming itself
        # checks the optimizer's own settings now, not mid-run (the steps are known later)
        self.optimizer_config(planned_steps=1)

    def grad_factor(self, batch: int) -> float:
        """What loss_mean_over multiplies a batch's mean-loss gradient by: batch / N (1.0
        without it)."""
        return 1.0 if self.loss_mean_over is None else batch / self.loss_mean_over

    def optimizer_config(self, planned_steps: int) -> OptimizerConfig:
        """The optimizer of a run whose workers each plan `planned_steps` steps."""
        return OptimizerConfig(name=self.optimizer, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay,
                               **self._schedule_settings(planned_steps))

    def optimizer_settings(self, planned_steps: int) -> dict:
        """What PSClient.init sends the servers beside the optimizer's name, for workers that
        each plan `planned_steps` steps."""
        settings = {"lr": self.lr, "weight_decay": self.weight_decay,
                    **self._schedule_settings(planned_steps)}
        if self.optimizer == "momentum":
            settings["momentum"] = self.momentum
        return settings

    def _schedule_settings(self, planned_steps: int) -> dict:
        # The planned steps go only where the schedule ends by them (a cosine without T_MAX):
        # otherwise a resumed run that asks for more steps would differ from its checkpoint's.
        if parse_schedule(self.lr_schedule).needs_total:
            return {"lr_schedule": self.lr_schedule, "planned_steps": planned_steps}
        return {"lr_schedule": self.lr_schedule} if self.lr_schedule else {}


@dataclass(frozen=True)
class SplitConfig:
    """How the training set is split into the workers' shards (every worker must agree)."""

    partition: str = setting("iid", "how the training set is split into the workers' shards",
                             choices=PARTITION_SCHEMES)
    alpha: float = setting(0.5, "label_skew's Dirichlet concentration (smaller: more skew)")

    def __post_init__(self) -> None:
        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(f"partition must be one of {', '.join(PARTITION_SCHEMES)}, "
                             f"got {self.partition!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
