"""A teaching kernel: a cache-blocked, parallel matrix product written in Numba.

The model never calls it: it uses NumPy `@` (BLAS). It is here so that students can read what
"cache blocking" means and see, in `make bench`, how far a clean Numba loop is from BLAS.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["blocked_matmul"]

# A 64 x 64 float32 tile is 16 KiB: three of them (A, B and C tiles) sit in a 48 KiB L1 cache.
_TILE = 64


@njit(cache=True, parallel=True)
def _blocked_matmul(a, b, out):
    """out = a @ b, tile by tile.

    Twin: NumPy `a @ b` (float64 reference in the tests). Tricks: each thread owns a band of
    output rows (no two threads write the same element, so no locks); within a band, the
    k-loop walks tiles so that the B tile is reused from cache for every row of the A tile; the
    innermost loop runs along a row of B and of out, contiguous in memory, so LLVM vectorises it.
    Parallel (prange): never call this from a gRPC handler thread.
    """
    n, k_dim = a.shape
    m = b.shape[1]
    n_bands = (n + _TILE - 1) // _TILE
    for band in prange(n_bands):
        i0 = band * _TILE
        i1 = min(i0 + _TILE, n)
        for i in range(i0, i1):
            for j in range(m):
                out[i, j] = 0.0
        for k0 in range(0, k_dim, _TILE):
            k1 = min(k0 + _TILE, k_dim)
            for j0 in range(0, m, _TILE):
                j1 = min(j0 + _TILE, m)
                for i in range(i0, i1):
                    for k in range(k0, k1):
                        a_ik = a[i, k]
                        for j in range(j0, j1):
                            out[i, j] += a_ik * b[k, j]


def blocked_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for float32 matrices a (n, k) and b (k, m), computed by the blocked Numba kernel."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
            raise TypeError(f"{name} must be a 2-D float32 ndarray, got {getattr(x, 'dtype', x)!r}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply a {a.shape} by b {b.shape}: inner sizes differ")
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    _blocked_matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out
