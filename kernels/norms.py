"""Norm checks for gradients: are they finite, how large are they, clip them to a global norm.

Servers refuse non-finite pushes with all_finite; clip_by_global_norm is
torch.nn.utils.clip_grad_norm_ (L2) over a list of float32 arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from numba import njit

__all__ = ["all_finite", "clip_by_global_norm", "global_norm"]

_CHUNK = 4096  # elements scanned between early exits: long enough to vectorise, short to stop
_EXP_BITS = np.int32(0x7F800000)  # exponent all ones: inf or NaN


def _check_float32(name: str, x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    return x


def _check_list(arrays: object) -> Sequence[np.ndarray]:
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"arrays must be a list or tuple of arrays, got {type(arrays).__name__}")
    for k, x in enumerate(arrays):
        _check_float32(f"arrays[{k}]", x)
    return arrays


# ---------------------------------------------------------------------------------------------
# all_finite


@njit(cache=True, nogil=True)
def _all_finite_kernel(bits):
    """True when no element of bits (float32 bit patterns, flat) is inf or NaN.

    Twin: twins.norms.all_finite. Tricks: a float is inf or NaN exactly when its exponent bits
    are all ones, so an integer max of (bits & exponent mask) over a chunk decides it; integer
    max vectorises where a float comparison loop with an early exit would not. Exit per chunk.
    """
    for c0 in range(0, bits.size, _CHUNK):
        # A slice indexed from 0: Numba then knows no index is negative and drops its
        # wraparound arithmetic, which would otherwise turn the loads into gathers.
        chunk = bits[c0 : c0 + _CHUNK]
        worst = np.int32(0)
        for i in range(chunk.size):
            worst = max(worst, chunk[i] & _EXP_BITS)
        if worst == _EXP_BITS:
            return False
    return True


def all_finite(x: np.ndarray) -> bool:
    """True when every element of the float32 array x (any shape, any strides) is finite."""
    _check_float32("x", x)
    flat = x.ravel(order="K")  # a view when x is contiguous in any order, else one copy
    return bool(_all_finite_kernel(flat.view(np.int32)))


# ---------------------------------------------------------------------------------------------
# global_norm


# reassoc lets LLVM split the sum over vector lanes (the only way this loop vectorises: eight
# hand-written partial sums did not, and ran at a quarter of BLAS's sdot); contract lets it
# fuse v * v + s. Neither assumes finite values (no nnan/ninf): an inf still gives inf, a NaN
# NaN.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sum_squares(x):
    """Sum of x[i]**2 over a flat float32 array, in float64.

    Twin: twins.norms.global_norm (which sums pairwise: equal to ~1e-12 relative, not bit for
    bit). Tricks: each square is exact in float64 (24+24 bits), so the only error is in the
    sum; the sum is reassociated over vector lanes, which also shortens its rounding-error
    chains. As fast as NumPy's float32 np.vdot (BLAS sdot), and a million times more accurate
    (sdot sums in float32: ~1e-6 relative against ~1e-13 here).
    """
    total = 0.0
    for i in range(x.size):
        v = np.float64(x[i])
        total += v * v
    return total


def _norm(arrays: Sequence[np.ndarray]) -> float:
    return math.sqrt(sum(_sum_squares(x.ravel(order="K")) for x in arrays))


def global_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of all elements of a list or tuple of float32 arrays, as one vector.

    Squares and sums are float64, so the result has ~1e-12 relative error and never overflows
    in the sum (torch's clip_grad_norm_ accumulates in float32). An empty list has norm 0.0;
    any inf gives inf, any NaN gives NaN.
    """
    return _norm(_check_list(arrays))


# ---------------------------------------------------------------------------------------------
# clip_by_global_norm


@njit(cache=True, nogil=True)
def _scale(x, c):
    """x *= c over a flat float32 array, c float32. Twin: the multiply in
    twins.norms.clip_by_global_norm. Trick: none; one vectorised pass.
    """
    for i in range(x.size):
        x[i] = x[i] * c


def clip_by_global_norm(arrays: Sequence[np.ndarray], max_norm: float) -> float:
    """Scale the arrays in place so that their global L2 norm is at most max_norm.

    As torch.nn.utils.clip_grad_norm_(arrays, max_norm) (L2): total = global_norm(arrays);
    coef = max_norm / (total + 1e-6), computed in float32 in torch's steps
    (1 / (total + 1e-6), then times max_norm: torch's scalar / tensor is reciprocal() * scalar);
    when coef < 1 every array is multiplied by coef. Returns total, the norm before clipping,
    as a float64 Python float. torch clamps coef to 1.0 and always multiplies; x * 1.0 == x for
    every float (bar signalling NaNs, which it quiets), so skipping is the same. A NaN total
    makes coef NaN and, as in torch, every array is multiplied by NaN; an inf total makes
    coef 0 (finite values become zeros, infs NaN). Check all_finite first to refuse such
    gradients instead. torch sums the norm in float32, so its total and coef can differ from
    these in the last bits; the clipped values then differ by a few ulp.

    arrays: float32, writable, contiguous (C or Fortran order), not sharing memory; a list or
    tuple. max_norm: >= 0 (+inf allowed). Everything is checked before anything is scaled.
    """
    _check_list(arrays)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not max_norm >= 0.0:  # also refuses NaN
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    spans = []
    for k, x in enumerate(arrays):
        if not (x.flags.c_contiguous or x.flags.f_contiguous):
            raise ValueError(f"arrays[{k}] must be contiguous to be scaled in place")
        if not x.flags.writeable:
            raise ValueError(f"arrays[{k}] is read-only, but clipping scales it in place")
        if x.size:
            start = x.__array_interface__["data"][0]
            spans.append((start, start + x.nbytes, k))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:  # it would be scaled twice
            raise ValueError(f"arrays[{a}] and arrays[{b}] share memory")
    total = _norm(arrays)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # inf and NaN as torch
        coef = (np.float32(1) / (np.float32(total) + np.float32(1e-6))) * np.float32(max_norm)
    if not coef >= 1:  # coef < 1, or NaN (as torch, which multiplies by the NaN)
        for x in arrays:
            _scale(x.ravel(order="K"), coef)
    return total
