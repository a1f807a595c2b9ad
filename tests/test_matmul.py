"""The teaching matmul against NumPy's float64 product."""

import numpy as np
import pytest

from kernels import blocked_matmul


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (64, 64, 64), (130, 70, 65)])
def test_blocked_matmul_matches_numpy(shape):
    n, k, m = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal((k, m), dtype=np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(blocked_matmul(a, b), want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_blocked_matmul_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="inner sizes differ"):
        blocked_matmul(np.zeros((2, 3), np.float32), np.zeros((4, 2), np.float32))
