"""Exact comparisons for the numerics tests: float32 bit for bit, reference values (torch's,
stored) written as hex bit patterns, dicts of arrays equal name by name."""

from __future__ import annotations

import numpy as np


def hex32(text: str) -> np.ndarray:
    """float32 array from its bit patterns written in hex, separated by spaces."""
    return np.array([int(w, 16) for w in text.split()], dtype=np.uint32).view(np.float32)


def assert_same_bits(got, want) -> None:
    """float32 bit for bit, except that two NaNs match whatever their sign and payload (a NaN
    made by inf - inf is the CPU's and the compiler's business)."""
    got, want = np.asarray(got), np.asarray(want, np.float32)
    assert got.dtype == np.float32, f"got {got.dtype}, not float32"
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same names, and under each name an equal array."""
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
