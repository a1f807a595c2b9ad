"""Optimizers as state plus a step: what a parameter server keeps beside each tensor.

`OptimizerConfig` names the rule and its settings; `Optimizer` holds the per-tensor state
(momentum buffers, Adam moments and step counts) and applies updates through the kernels.
The single-process trainer uses the same class, so both sides update weights identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels import adam_update, sgd_update, sgd_update_codes

__all__ = ["OPTIMIZERS", "OptimizerConfig", "Optimizer"]

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # "sgd" | "momentum" (SGD with a momentum buffer) | "adam"
    lr: float = 0.1  # step size; the staleness policy may scale it per update
    momentum: float = 0.9  # used by "momentum" only
    nesterov: bool = False  # used by "momentum" only
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator guard
    weight_decay: float = 0.0  # L2 penalty added to the gradient, as torch.optim does

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


class Optimizer:
    """Per-tensor optimizer state for a set of named float32 tensors, updated in place."""

    def __init__(self, config: OptimizerConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        self.config = config
        self.state: dict[str, dict[str, np.ndarray | int]] = {}
        for name, shape in shapes.items():
            if config.name == "momentum":
                # A buffer of -0.0 gives torch's first step (buf = g) bit for bit, since
                # momentum * -0.0 + g == g even for g = -0.0 (a +0.0 buffer would make it +0.0).
                self.state[name] = {"buf": np.full(shape, -0.0, np.float32)}
            elif config.name == "adam":
                self.state[name] = {
                    "m": np.zeros(shape, np.float32),
                    "v": np.zeros(shape, np.float32),
                    "step": 0,
                }
            else:
                self.state[name] = {}

    def step(self, name: str, param: np.ndarray, grad: np.ndarray, lr: float | None = None,
             keep_finite: bool = False, dry_run: bool = False) -> bool:
        """Apply one update to `param` (in place) from `grad`; `lr` overrides the configured one.

        Returns whether it was applied. keep_finite: only if every new weight and state value
        is finite, else nothing changes; dry_run: change nothing, say whether it would stay
        finite (see kernels.sgd_update).
        """
        cfg = self.config
        lr = cfg.lr if lr is None else lr
        state = self.state[name]
        checks = {"keep_finite": keep_finite, "dry_run": dry_run}
        if cfg.name == "adam":
            # The count advances only once the kernel wrote the update (a refusal, or a dry
            # run, changes nothing).
            written = adam_update(
                param, grad, state["m"], state["v"], state["step"] + 1, lr,
                beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                **checks,
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

    @property
    def fuses_codes(self) -> bool:
        """Whether step_codes can apply a gradient straight from its 16-bit codes: plain SGD
        without weight decay (every other rule takes the float32 gradient to step)."""
        return self.config.name == "sgd" and self.config.weight_decay == 0.0

    def step_codes(self, name: str, param: np.ndarray, codes: np.ndarray, fmt: str,
                   scale: float = 1.0, lr: float | None = None, keep_finite: bool = False,
                   dry_run: bool = False) -> bool:
        """step() from a gradient still in 16-bit codes (fmt "float16" or "bfloat16") times a
        loss scale: bit for bit step(name, param, decode(codes) / float32(scale), lr), in one
        pass without the float32 gradient. Only where fuses_codes. Returns and checks as
        step()."""
        if not self.fuses_codes:
            raise ValueError(f"step_codes: {self.config.name} with weight decay "
                             f"{self.config.weight_decay} needs the float32 gradient; decode "
                             f"the codes and call step")
        return sgd_update_codes(param, codes, fmt, self.config.lr if lr is None else lr, scale,
                                keep_finite=keep_finite, dry_run=dry_run)
