"""Plain-NumPy twins of kernels/norms.py: the specification, written to be obviously right."""

import math

import numpy as np

__all__ = ["all_finite", "clip_by_global_norm", "global_norm"]


def all_finite(x):
    return bool(np.all(np.isfinite(x)))


def global_norm(arrays):
    # float64 squares and sums (NumPy sums pairwise; the kernel over vector lanes)
    return math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in arrays))


def clip_by_global_norm(arrays, max_norm):
    total = global_norm(arrays)
    f32 = np.float32
    with np.errstate(all="ignore"):
        # torch: max_norm / (total + 1e-6) on a float32 tensor is reciprocal() * max_norm
        coef = (f32(1) / (f32(total) + f32(1e-6))) * f32(max_norm)
    if not coef >= 1:  # coef < 1 or NaN: torch multiplies by min(coef, 1.0), NaN included
        for x in arrays:
            x *= coef
    return total
