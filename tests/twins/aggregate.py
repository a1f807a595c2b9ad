"""Plain-NumPy twins of kernels/aggregate.py: the specification, written to be obviously right.

g is a float32 array (W, n), one row per worker. Sums are float64, in the order written here,
and rounded once to float32.
"""

import math

import numpy as np

__all__ = [
    "aggregate_mean",
    "aggregate_median",
    "aggregate_trimmed_mean",
    "sort_columns",
]


def aggregate_mean(g):
    acc = np.zeros(g.shape[1], np.float64)
    for row in g:  # worker 0, 1, ..., W-1
        acc += row.astype(np.float64)
    return (acc / g.shape[0]).astype(np.float32)


def sort_columns(g):
    """Each column sorted ascending: NaN last (as one quiet NaN), -0.0 before +0.0."""
    g = np.where(np.isnan(g), np.float32(np.nan), g)
    order = np.lexsort((~np.signbit(g), g), axis=0)  # last key first: value, then sign of zero
    return np.take_along_axis(g, order, axis=0)


def aggregate_median(g):
    s = sort_columns(g)
    W = g.shape[0]
    if W % 2 == 1:
        return s[W // 2].copy()
    lo = s[W // 2 - 1].astype(np.float64)
    hi = s[W // 2].astype(np.float64)
    return ((lo + hi) / 2).astype(np.float32)


def aggregate_trimmed_mean(g, trim_fraction):
    s = sort_columns(g)
    W = g.shape[0]
    k = math.floor(trim_fraction * W)
    acc = np.zeros(g.shape[1], np.float64)
    for row in s[k : W - k]:  # ascending
        acc += row.astype(np.float64)
    return (acc / (W - 2 * k)).astype(np.float32)
