"""Preprocessing: clean, split, standardise and augment arrays of examples.

Pure NumPy functions on (X, y) arrays, used by the data loaders and on their own
(a trainer calls `augment_shifts` on each batch). No file I/O here.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "augment_shifts",
    "check_test_fraction",
    "drop_nonfinite",
    "fit_standardizer",
    "standardize",
    "stratified_split",
]


def drop_nonfinite(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Remove rows where any feature (or a float label) is NaN or ±inf.

    Returns (X kept, y kept, number of rows dropped). Rows keep their order.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"expected X (n, features) and y (n,), got {X.shape} and {y.shape}")
    keep = np.ones(len(X), dtype=bool)
    if np.issubdtype(X.dtype, np.floating):
        keep &= np.isfinite(X).all(axis=1)
    if np.issubdtype(y.dtype, np.floating):
        keep &= np.isfinite(y)
    dropped = int(len(X) - np.count_nonzero(keep))
    if dropped == 0:
        return X, y, 0
    return X[keep], y[keep], dropped


def check_test_fraction(test_fraction: float) -> None:
    """Raise ValueError unless 0 < test_fraction < 1."""
    # `not (0 < f < 1)` also rejects NaN, which compares false with everything.
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _test_counts(counts: np.ndarray, test_fraction: float) -> np.ndarray:
    """Largest-remainder rounding of counts * test_fraction (see stratified_split)."""
    quota = counts * test_fraction
    n_test = np.floor(quota).astype(np.int64)
    left = math.floor(counts.sum() * test_fraction + 0.5) - int(n_test.sum())
    # Stable sort on the negated remainder: largest first, smaller label on ties.
    for c in np.argsort(-(quota - n_test), kind="stable"):
        if left <= 0:
            break
        if n_test[c] + 1 < counts[c]:
            n_test[c] += 1
            left -= 1
    return n_test


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices: returns (train_idx, test_idx).

    Rounding: the test split gets t = floor(n * f + 1/2) rows (half up). Class c with n_c
    rows sends floor(n_c * f) of them; the t - sum(floor) rows left over go one each to
    the classes with the largest fractional part n_c * f - floor(n_c * f) (ties to the
    smaller label), skipping a class that would then have no training row. So every class
    is within one row of its share, the test split has t rows whenever that is possible,
    and every class keeps at least one training row. Both index arrays come back
    shuffled (the source may be sorted by class), and the result is a pure function of
    (y, test_fraction, seed).
    """
    y = np.asarray(y)
    check_test_fraction(test_fraction)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    classes, counts = np.unique(y, return_counts=True)
    n_test = _test_counts(counts, test_fraction)
    if n_test.sum() == 0:
        raise ValueError(
            f"test_fraction={test_fraction} of {len(y)} rows leaves the test split empty"
        )
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label, k in zip(classes, n_test, strict=True):
        members = rng.permutation(np.flatnonzero(y == label))
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    train_idx = np.concatenate(train_parts)
    test_idx = np.concatenate(test_parts)
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return train_idx, test_idx


_BLOCK_ROWS = 4096  # rows per float64 block in fit_standardizer


def fit_standardizer(X_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training rows, as float32 (n_features,) arrays.

    Statistics are accumulated in float64 (60,000 float32 rows lose digits otherwise).
    A constant feature (max == min on the training rows) gets std 1, not 0: dividing by
    zero would turn it into NaN, and with 1 it simply becomes 0 on every training row.
    """
    X_train = np.asarray(X_train)
    if X_train.ndim != 2 or len(X_train) == 0:
        raise ValueError(f"expected a non-empty (n, features) array, got {X_train.shape}")
    mean = X_train.mean(axis=0, dtype=np.float64)
    # Two-pass variance over blocks of rows: one float64 copy of all of X_train would be
    # 376 MB at 60,000 x 784 and three times slower.
    sq_dev = np.zeros_like(mean)
    for start in range(0, len(X_train), _BLOCK_ROWS):
        dev = X_train[start : start + _BLOCK_ROWS].astype(np.float64) - mean
        sq_dev += np.einsum("ij,ij->j", dev, dev)
    std = np.sqrt(sq_dev / len(X_train))
    constant = X_train.max(axis=0) == X_train.min(axis=0)
    std[constant] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(X - mean) / std as a new float32 array; pass the TRAINING split's mean and std."""
    out = np.subtract(X, mean, dtype=np.float32)
    out /= std
    return out


# Offsets (d_row, d_col) for "none", "up", "down", "left", "right": what each output
# pixel (r, c) reads is input pixel (r + d_row, c + d_col), zero outside the image.
_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def augment_shifts(
    X: np.ndarray, image_shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Move each image by one pixel up, down, left, right or not at all (equally likely).

    X is (n, rows*cols) or (n, rows, cols); the result is a new array of the same shape
    and dtype, with the uncovered edge filled with 0. On standardised data 0 is the
    training mean of that pixel, which is background at an image's border. Vectorised:
    one slice copy per direction over the whole batch, so it is cheap per batch.
    """
    rows, cols = image_shape
    X = np.asarray(X)
    if X.ndim not in (2, 3) or X.shape[1:] not in ((rows * cols,), (rows, cols)):
        raise ValueError(
            f"augment_shifts: expected images of shape (n, {rows * cols}) or "
            f"(n, {rows}, {cols}), got {X.shape}"
        )
    images = X.reshape(len(X), rows, cols)
    out = np.zeros_like(images)
    choice = rng.integers(0, len(_SHIFTS), size=len(X))
    for k, (dr, dc) in enumerate(_SHIFTS):
        sel = np.flatnonzero(choice == k)
        if sel.size:
            out[sel, _dst(dr, rows), _dst(dc, cols)] = images[sel, _src(dr, rows), _src(dc, cols)]
    return out.reshape(X.shape)


def _src(d: int, n: int) -> slice:
    """The input rows (or columns) that stay inside the image when output r reads r + d."""
    return slice(max(d, 0), n + min(d, 0))


def _dst(d: int, n: int) -> slice:
    """The output rows (or columns) they land on; the rest stay 0."""
    return slice(max(-d, 0), n - max(d, 0))
