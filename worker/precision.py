"""Mixed precision on a CPU: where values are rounded to 16 bits, and the loss scaler.

`Precision` names a format and rounds arrays to it with the bit-exact kernels; the model calls
it where hardware would hold 16-bit values. `LossScaler` has the semantics of PyTorch's
torch.amp.GradScaler: scale the loss so that small gradients survive 16 bits, skip steps whose
gradients overflowed, and adapt the scale.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kernels import all_finite, round_to_bf16, round_to_fp16
from ps.settings import setting

__all__ = ["GROWTH_INTERVAL", "INIT_SCALE", "PRECISIONS", "LossScaler", "Precision",
           "PrecisionConfig", "parse_loss_scale"]

PRECISIONS = ("fp32", "fp16", "bf16")
_WIRE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ROUND = {"fp16": round_to_fp16, "bf16": round_to_bf16}


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"  # fp32 | fp16 | bf16

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.name!r}")

    @property
    def wire_dtype(self) -> str:
        """The format weights and gradients travel in."""
        return _WIRE[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def round(self, x: np.ndarray) -> np.ndarray:
        """x rounded to this format (held as float32); fp32 returns x itself."""
        if not self.mixed:
            return x
        return _ROUND[self.name](np.ascontiguousarray(x, dtype=np.float32))


# torch.amp.GradScaler's defaults for dynamic scaling: the first scale, and how many good steps
# in a row double it.
INIT_SCALE = 65536.0
GROWTH_INTERVAL = 2000


class LossScaler:
    """Dynamic loss scaling, as torch.amp.GradScaler does it (the scale kept in float32).

    scale(loss) -> loss * scale; unscale(grads) divides them in place and says whether all are
    finite; update(found_inf) backs the scale off after a non-finite step and grows it after
    `growth_interval` good steps in a row. enabled=False makes it the identity (scale 1).
    """

    def __init__(self, init_scale: float = INIT_SCALE, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = GROWTH_INTERVAL,
                 enabled: bool = True) -> None:
        if not init_scale > 0 or not np.isfinite(init_scale):
            raise ValueError(f"init_scale must be positive and finite, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.enabled = enabled
        self._scale = np.float32(init_scale if enabled else 1.0)
        self._growth = np.float32(growth_factor)
        self._backoff = np.float32(backoff_factor)
        self.growth_interval = growth_interval
        self._good_steps = 0  # torch's growth tracker

    def get_scale(self) -> float:
        return float(self._scale) if self.enabled else 1.0

    def scale(self, loss: float) -> float:
        return float(np.float32(loss) * self._scale) if self.enabled else loss

    def unscale(self, grads: Mapping[str, np.ndarray]) -> bool:
        """Divide every gradient by the scale, in place: multiply by the reciprocal, taken in
        float64 and rounded to float32 as torch does; True when every value is finite."""
        finite = all(all_finite(g) for g in grads.values())
        if self.enabled:
            inv = np.float32(1.0 / np.float64(self._scale))
            for g in grads.values():
                g *= inv
        return finite

    def update(self, found_inf: bool) -> None:
        """After a step: back off on inf/NaN, or count a good step and grow after enough."""
        if not self.enabled:
            return
        if found_inf:
            self._scale = np.float32(self._scale * self._backoff)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            with np.errstate(over="ignore"):  # growing past float32's range gives inf: kept out
                grown = np.float32(self._scale * self._growth)
            if np.isfinite(grown):  # torch keeps the old scale rather than grow to inf
                self._scale = grown
            self._good_steps = 0


def parse_loss_scale(text: str) -> float | str:
    """"auto", "dynamic", "off" or a static scale such as "1024"."""
    if text in ("auto", "dynamic", "off"):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected auto, dynamic, off or a number, got {text!r}") from None


@dataclass(frozen=True)
class PrecisionConfig:
    """A worker's number format and its loss scaling (servers keep fp32 master weights)."""

    precision: str = setting("fp32", "worker compute and wire format", choices=PRECISIONS)
    # "auto": dynamic for fp16, off for bf16 and fp32; "dynamic"; "off"; or a static scale.
    loss_scale: float | str = setting(
        "auto", "auto (dynamic for fp16, off for bf16), dynamic, off, or a static scale such "
                "as 1024", parse=parse_loss_scale)
    # GradScaler's names: the first scale, and how many good steps in a row double it. A short
    # interval shows the scale climbing within a classroom run.
    init_scale: float = setting(INIT_SCALE, "dynamic loss scaling: the first scale")
    growth_interval: int = setting(
        GROWTH_INTERVAL, "dynamic loss scaling: good steps in a row that double the scale")

    def __post_init__(self) -> None:
        Precision(self.precision)
        if isinstance(self.loss_scale, str):
            if self.loss_scale not in ("auto", "dynamic", "off"):
                raise ValueError(f"loss_scale must be auto, dynamic, off or a number, "
                                 f"got {self.loss_scale!r}")
        elif not (self.loss_scale > 0 and math.isfinite(self.loss_scale)):
            raise ValueError(f"a static loss scale must be positive, got {self.loss_scale}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval,
                                                                    numbers.Integral):
            raise TypeError(f"growth_interval must be an int, got {self.growth_interval!r}")
        LossScaler(init_scale=self.init_scale, growth_interval=self.growth_interval)
        tuned = (self.init_scale, self.growth_interval) != (INIT_SCALE, GROWTH_INTERVAL)
        if tuned and self.scaling() != "dynamic":
            # Silently ignoring them would leave the user reading a scale they did not get.
            raise ValueError(
                f"init_scale and growth_interval apply to dynamic loss scaling, but this run's "
                f"loss scale is {self.scaling()} (loss_scale {self.loss_scale!r}, precision "
                f"{self.precision})")

    def scaling(self) -> float | str:
        """dynamic, off, or the static scale: what loss_scale means at this precision."""
        if self.loss_scale == "auto":
            return "dynamic" if self.precision == "fp16" else "off"
        return self.loss_scale

    def scaler(self) -> tuple[LossScaler, bool]:
        """The loss scaler this config asks for, and whether it adapts (dynamic)."""
        mode = self.scaling()
        if mode == "off":
            return LossScaler(enabled=False), False
        if mode == "dynamic":
            return LossScaler(init_scale=self.init_scale,
                              growth_interval=self.growth_interval), True
        return LossScaler(init_scale=float(mode)), False
