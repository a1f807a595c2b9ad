"""Bounds: upper bounds on |x| over a key's weights and optimizer state, carried from update to
update, so that most updates are known to stay finite without a check pass over the arrays.

after_step follows each kernel's float32 operations (kernels/optim.py) on bounds, in float64,
each rounding allowed for by a relative 2**-20 (float32's is 2**-24): when every intermediate
bound stays below float32's largest, no value of the update can be inf or NaN.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

__all__ = ["FORMAT_MAX", "after_step"]


class Rule(Protocol):
    """What after_step reads of an OptimizerConfig (ps/optimizer.py, which imports this)."""

    name: str
    momentum: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

_F32_MAX = float(np.finfo(np.float32).max)
_LIMIT = _F32_MAX * (1 - 2.0**-20)  # a bound at most this: the float32 value is finite
FORMAT_MAX = {"float16": 65504.0, "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32))}


def _up(x: float) -> float:
    """x, widened by more than a float32 rounding."""
    return x * (1 + 2.0**-20)


_HALFWAY = 3.4028235677973366e38  # float32's largest + half an ulp: from here on, inf


def _f32(x: float) -> float:
    """x as the kernels see it: rounded to float32 (inf past its range, NaN as inf)."""
    return float(np.float32(x)) if abs(x) < _HALFWAY else math.inf


def after_step(config: Rule, lr: float, step: int, bounds: dict[str, float],
               grad_bound: float) -> dict[str, float] | None:
    """Bounds on the values after one update of `config` with step size `lr` (Adam: its
    `step`-th), from `bounds` on them before ("param", and "buf" or "m" and "v") and on the
    gradient's |g|; None when they cannot show that every value stays finite."""
    p, g = bounds["param"], grad_bound
    inter = [p, g]  # every bound that must stay finite
    if config.weight_decay and config.name == "adamw":  # param = param * (1 - lr*wd)
        p = _up(p * abs(_f32(1 - lr * config.weight_decay)))
        inter.append(p)
    elif config.weight_decay:  # g = fma(param, wd, grad)
        g = _up(p * _f32(config.weight_decay) + g)
        inter.append(g)
    out = dict(bounds)
    if config.name in ("adam", "adamw"):
        w1 = _f32(1 - config.beta1)
        d = _up(g + bounds["m"])  # g - m
        m = _up(d * max(w1, abs(w1 - 1)) + max(bounds["m"], g))  # either lerp
        v = _up(_up(_up(_f32(1 - config.beta2) * g) * g) + _up(bounds["v"] * _f32(config.beta2)))
        eps = _f32(config.eps)
        step_size = abs(_f32(lr / (1 - config.beta1**step)))
        if eps == 0.0:
            return None
        move = _up(_up(step_size * m) / eps)  # the denominator is at least eps
        inter += [d, m, v, _up(step_size * m), move]
        out.update(m=m, v=v, param=_up(p + move))
    else:
        momentum = _f32(config.momentum) if config.name == "momentum" else 0.0
        if momentum:
            buf = _up(_up(bounds["buf"] * momentum) + g)  # buf*momentum + g
            g = _up(buf * momentum + g) if config.nesterov else buf
            inter += [buf, g]
            out["buf"] = buf
        out["param"] = _up(p + _f32(lr) * g)  # fma(g, -lr, param)
    inter.append(out["param"])
    if all(math.isfinite(x) and x <= _LIMIT for x in inter):
        return out
    return None
