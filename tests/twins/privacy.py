"""Plain-NumPy twin of kernels/privacy.py: per-example gradients built one at a time."""

import numpy as np

__all__ = ["outer_sq_norms"]


def outer_sq_norms(a, d):
    # The (in, out) gradient of each example, materialised: what the kernel avoids.
    return np.array([np.sum(np.outer(a[i].astype(np.float64), d[i].astype(np.float64)) ** 2)
                     for i in range(a.shape[0])])
