"""Per-example gradient norms of dense layers, for DP-SGD's per-example clipping.

Example i's gradient of a dense weight is the outer product a_i d_i^T of the layer's input and
its backward signal, and the norm of an outer product is the product of the two norms: so a
batch's per-example norms cost O(batch * (in + out)), never a (batch, in, out) tensor.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["outer_sq_norms"]


@njit(cache=True, nogil=True)
def _outer_sq_norms_kernel(a, d, out):
    """out[i] += |a_i|^2 |d_i|^2, sums in float64. Twin: twins.privacy.outer_sq_norms."""
    for i in range(a.shape[0]):
        sa = 0.0
        for j in range(a.shape[1]):
            sa += np.float64(a[i, j]) * np.float64(a[i, j])
        sd = 0.0
        for k in range(d.shape[1]):
            sd += np.float64(d[i, k]) * np.float64(d[i, k])
        out[i] += sa * sd


def outer_sq_norms(a: np.ndarray, d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Squared Frobenius norms of the per-example outer products a[i] (x) d[i], as float64.

    a: (batch, in) and d: (batch, out), float32. With `out` (float64, (batch,)) the norms are
    added to it, so that a model sums its layers' shares in one buffer.
    """
    for name, x in (("a", a), ("d", d)):
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
            raise TypeError(f"{name} must be a float32 array of shape (batch, n), got "
                            f"{getattr(x, 'dtype', type(x).__name__)} "
                            f"{getattr(x, 'shape', '')}")
    if a.shape[0] != d.shape[0]:
        raise ValueError(f"a and d must have one row per example: {a.shape[0]} != {d.shape[0]}")
    if out is None:
        out = np.zeros(a.shape[0], np.float64)
    elif out.dtype != np.float64 or out.shape != (a.shape[0],):
        raise ValueError(f"out must be float64 of shape ({a.shape[0]},), got {out.dtype} "
                         f"{out.shape}")
    _outer_sq_norms_kernel(np.ascontiguousarray(a), np.ascontiguousarray(d), out)
    return out
