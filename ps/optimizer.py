"""Optimizers as state plus a step: what a parameter server keeps beside each tensor.

`OptimizerConfig` names the rule and its settings; `Optimizer` holds the per-tensor state
(momentum buffers, Adam moments and step counts) and applies updates through the kernels.
The single-process trainer uses the same class, so both sides update weights identically.
The step size of an update is the config's `lr_at` the key's update count (ps/schedule.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from kernels import adam_update, amax, sgd_update, sgd_update_codes
from ps.bounds import FORMAT_MAX, after_step
from ps.schedule import Constant, parse_schedule

__all__ = ["OPTIMIZERS", "OptimizerConfig", "Optimizer"]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # "sgd" | "momentum" (SGD with a momentum buffer) | "adam" | "adamw"
    lr: float = 0.1  # step size; the staleness policy may scale it per update
    momentum: float = 0.9  # used by "momentum" only
    nesterov: bool = False  # used by "momentum" only
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator guard
    # L2 penalty added to the gradient, as torch.optim does; adamw: decoupled, as torch's
    # AdamW (param *= 1 - lr*weight_decay before the step)
    weight_decay: float = 0.0
    lr_schedule: str | None = None  # ps/schedule.py's grammar; None: lr at every update
    # Steps each worker plans to make: with the updates a key takes per step (sync 1, async
    # and ssp one per worker), the run's total, a cosine's default T_MAX. None: not known.
    planned_steps: int | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        schedule = parse_schedule(self.lr_schedule)
        if isinstance(schedule, Constant):
            object.__setattr__(self, "lr_schedule", None)  # "constant" and None: equal configs
        if self.planned_steps is not None and self.planned_steps < 1:
            raise ValueError(f"planned_steps must be >= 1, got {self.planned_steps}")
        if schedule.needs_total and self.planned_steps is None:
            raise ValueError(f"--lr-schedule {self.lr_schedule!r}: a cosine without T_MAX "
                             f"needs the run's planned steps (planned_steps)")

    def lr_at(self, count: int, updates_per_step: int = 1) -> float:
        """The step size of a key's update after `count` updates (torch's lr after `count`
        scheduler steps). updates_per_step: updates a key takes per worker step (sync 1;
        async and ssp: the workers), which with planned_steps makes the run's total."""
        if self.lr_schedule is None:
            return self.lr
        total = None if self.planned_steps is None else self.planned_steps * updates_per_step
        return parse_schedule(self.lr_schedule).lr(self.lr, count, total)


class Optimizer:
    """Per-tensor optimizer state for a set of named float32 tensors, updated in place."""

    def __init__(self, config: OptimizerConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        self.config = config
        self.state: dict[str, dict[str, np.ndarray | int]] = {}
        # name -> upper bounds on |param| and each state array (ps/bounds.py); None: unknown,
        # measured when next needed. Only checked updates keep them.
        self.bounds: dict[str, dict[str, float] | None] = dict.fromkeys(shapes)
        for name, shape in shapes.items():
            if config.name == "momentum":
                # A buffer of -0.0 gives torch's first step (buf = g) bit for bit, since
                # momentum * -0.0 + g == g even for g = -0.0 (a +0.0 buffer would make it +0.0).
                self.state[name] = {"buf": np.full(shape, -0.0, np.float32)}
            elif config.name in ("adam", "adamw"):
                self.state[name] = {
                    "m": np.zeros(shape, np.float32),
                    "v": np.zeros(shape, np.float32),
                    "step": 0,
                }
            else:
                self.state[name] = {}

    def step(self, name: str, param: np.ndarray, grad: np.ndarray, lr: float | None = None,
             keep_finite: bool = False, dry_run: bool = False,
             grad_bound: float | None = None) -> bool:
        """Apply one update to `param` (in place) from `grad`; `lr` overrides the configured one.

        Returns whether it was applied. keep_finite: only if every new weight and state value
        is finite, else nothing changes; dry_run: change nothing, say whether it would stay
        finite (see kernels.sgd_update). Both first try the bounds (ps/bounds.py): an update
        they show to stay finite needs no check pass over the arrays. grad_bound: max |grad|
        if the caller knows it (else it is measured).
        """
        return self._update(name, param, lr, keep_finite, dry_run,
                            lambda: amax(grad) if grad_bound is None else grad_bound,
                            partial(self._kernel, name, param, grad))

    def _kernel(self, name: str, param: np.ndarray, grad: np.ndarray, lr: float,
                keep_finite: bool, dry_run: bool) -> bool:
        cfg = self.config
        state = self.state[name]
        checks = {"keep_finite": keep_finite, "dry_run": dry_run}
        if cfg.name in ("adam", "adamw"):
            # The count advances only once the kernel wrote the update (a refusal, or a dry
            # run, changes nothing).
            written = adam_update(
                param, grad, state["m"], state["v"], state["step"] + 1, lr,
                beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                decoupled=cfg.name == "adamw", **checks,
            )
            if written and not dry_run:
                state["step"] += 1
            return written
        if cfg.name == "momentum":
            return sgd_update(
                param, grad, lr, momentum=cfg.momentum, buf=state["buf"],
                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **checks,
            )
        return sgd_update(param, grad, lr, weight_decay=cfg.weight_decay, **checks)

    def _update(self, name: str, param: np.ndarray, lr: float | None, keep_finite: bool,
                dry_run: bool, grad_bound: Callable[[], float],
                kernel: Callable[[float, bool, bool], bool]) -> bool:
        """kernel(lr, keep_finite, dry_run), unless the bounds show the update stays finite:
        then a dry run is answered at once, and keep_finite writes without a check pass."""
        lr = self.config.lr if lr is None else lr
        if not (keep_finite or dry_run):
            self.bounds[name] = None  # unchecked: nothing is known of the values after it
            return kernel(lr, False, False)
        after = self._after(name, param, lr, grad_bound())
        if after is not None:
            if not dry_run:
                kernel(lr, False, False)
                self.bounds[name] = after
            return True
        written = kernel(lr, keep_finite, dry_run)
        if written and not dry_run:
            self.bounds[name] = None  # measured again when next needed
        return written

    def _after(self, name: str, param: np.ndarray, lr: float,
               grad_bound: float) -> dict[str, float] | None:
        """The bounds after the update if they show every value stays finite, else None. Bounds
        that grew loose over many updates are measured again (a pass over each array) before
        giving up."""
        state = self.state[name]
        step = int(state.get("step", 0)) + 1
        known = self.bounds.get(name)
        if known is not None:
            after = after_step(self.config, lr, step, known, grad_bound)
            if after is not None:
                return after
        measured = {"param": amax(param)}
        measured.update({k: amax(v) for k, v in state.items() if isinstance(v, np.ndarray)})
        if "v" in state and state["v"].size and state["v"].min() < 0:
            return None  # the bounds take Adam's v >= 0, as every update keeps it (a restored
            # checkpoint could hold anything)
        self.bounds[name] = measured
        return after_step(self.config, lr, step, measured, grad_bound)

    @property
    def fuses_codes(self) -> bool:
        """Whether step_codes can apply a gradient straight from its 16-bit codes: plain SGD
        without weight decay (every other rule takes the float32 gradient to step)."""
        return self.config.name == "sgd" and self.config.weight_decay == 0.0

    def step_codes(self, name: str, param: np.ndarray, codes: np.ndarray, fmt: str,
                   scale: float = 1.0, lr: float | None = None, keep_finite: bool = False,
                   dry_run: bool = False, codes_finite: bool = False) -> bool:
        """step() from a gradient still in 16-bit codes (fmt "float16" or "bfloat16") times a
        loss scale: bit for bit step(name, param, decode(codes) / float32(scale), lr), in one
        pass without the float32 gradient. Only where fuses_codes. Returns and checks as
        step(); codes_finite: the caller has checked that no code is inf or NaN, so that the
        bounds may take the format's largest value as |g| without reading the codes."""
        if not self.fuses_codes:
            raise ValueError(f"step_codes: {self.config.name} with weight decay "
                             f"{self.config.weight_decay} needs the float32 gradient; decode "
                             f"the codes and call step")
        # |g| is at most the format's largest finite value over the scale; codes not known to
        # be finite go to the check pass (an infinite bound shows nothing).
        return self._update(name, param, lr, keep_finite, dry_run,
                            lambda: (FORMAT_MAX[fmt] / scale * (1 + 2.0**-20) if codes_finite
                                     else math.inf),
                            lambda lr, keep, dry: sgd_update_codes(
                                param, codes, fmt, lr, scale, keep_finite=keep, dry_run=dry))
