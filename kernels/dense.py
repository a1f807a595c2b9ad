"""Dense-layer pieces around the matrix product: bias + ReLU, its backward mask, and the loss.

The matrix products themselves stay NumPy `@` (BLAS); these kernels fuse the cheap elementwise
work around them so that each activation is read and written once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bias_relu_forward", "relu_backward", "relu_forward", "softmax_cross_entropy"]


@njit(cache=True, nogil=True)
def _bias_relu(z, bias, out):
    """out[i, j] = max(z[i, j] + bias[j], 0).

    Twin: twins.dense.bias_relu_forward. One pass, row-major, so the bias row stays in cache.
    """
    rows, cols = z.shape
    for i in range(rows):
        for j in range(cols):
            v = z[i, j] + bias[j]
            out[i, j] = v if v > 0.0 else 0.0


@njit(cache=True, nogil=True)
def _relu(x, out):
    """out = x where x > 0, else +0.0 (any shape, flat).

    Twin: twins.dense.relu_forward. Writes +0.0 for -0.0 and NaN too: the bits _bias_relu
    gives, so that a Dense then a ReLU computes what the fused kernel computed.
    """
    v = x.ravel()
    o = out.ravel()
    for i in range(v.size):
        o[i] = v[i] if v[i] > 0.0 else 0.0


@njit(cache=True, nogil=True)
def _relu_backward(grad_out, activation, out):
    """out = grad_out where activation > 0, else 0.

    Twin: twins.dense.relu_backward. The mask is read from the ReLU's output (a > 0 exactly
    where z > 0), so the forward pass need not keep the pre-activation.
    """
    g = grad_out.ravel()
    a = activation.ravel()
    o = out.ravel()
    for i in range(g.size):
        o[i] = g[i] if a[i] > 0.0 else 0.0


@njit(cache=True, nogil=True)
def _softmax_cross_entropy(logits, labels, dlogits):
    """Mean cross-entropy of softmax(logits) against labels; writes d(mean loss)/d(logits).

    Twin: twins.dense.softmax_cross_entropy. Tricks: subtract the row maximum before exp (so
    logits of +-1e4 neither overflow nor underflow to a zero sum), take the loss as
    log(sum) - shifted[label] instead of log(softmax) (no log of an underflowed 0), and
    accumulate the loss in float64.
    """
    rows, cols = logits.shape
    inv_rows = np.float32(1.0 / rows)
    total = 0.0
    for i in range(rows):
        row_max = logits[i, 0]
        for j in range(1, cols):
            if logits[i, j] > row_max:
                row_max = logits[i, j]
        denom = np.float32(0.0)
        for j in range(cols):
            e = np.exp(logits[i, j] - row_max)
            dlogits[i, j] = e
            denom += e
        label = labels[i]
        total += np.log(np.float64(denom)) - np.float64(logits[i, label] - row_max)
        scale = inv_rows / denom
        for j in range(cols):
            dlogits[i, j] *= scale
        dlogits[i, label] -= inv_rows
    return total / rows


def _check_float32(name: str, x: np.ndarray, ndim: int | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a float32 ndarray, got {got}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")


def bias_relu_forward(z: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ReLU(z + bias) for z of shape (batch, out) and bias of shape (out,); a new array."""
    _check_float32("z", z, 2)
    _check_float32("bias", bias, 1)
    if bias.shape[0] != z.shape[1]:
        raise ValueError(f"bias has {bias.shape[0]} values but z has {z.shape[1]} columns")
    out = np.empty_like(z, order="C")
    _bias_relu(z, bias, out)
    return out


def relu_forward(x: np.ndarray) -> np.ndarray:
    """max(x, 0) of a float32 array of any shape; a new array."""
    _check_float32("x", x)
    out = np.empty(x.shape, dtype=np.float32)
    _relu(np.ascontiguousarray(x), out)
    return out


def relu_backward(grad_out: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """The gradient through a ReLU, given the ReLU's output: grad_out * (activation > 0)."""
    _check_float32("grad_out", grad_out)
    _check_float32("activation", activation)
    if grad_out.shape != activation.shape:
        raise ValueError(
            f"grad_out has shape {grad_out.shape} but activation has shape {activation.shape}"
        )
    out = np.empty(grad_out.shape, dtype=np.float32)
    _relu_backward(np.ascontiguousarray(grad_out), np.ascontiguousarray(activation), out)
    return out


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient: (loss, dlogits) with dlogits (batch, classes).

    dlogits = (softmax(logits) - onehot(labels)) / batch, the gradient of the *mean* loss.
    """
    _check_float32("logits", logits, 2)
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"logits must be non-empty, got shape {logits.shape}")
    labels = np.asarray(labels)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be {rows} integers (one per row of logits), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= cols))
    if bad.size:
        raise ValueError(
            f"labels[{bad[0]}] = {labels[bad[0]]} is out of range for {cols} classes"
        )
    dlogits = np.empty((rows, cols), dtype=np.float32)
    loss = _softmax_cross_entropy(
        np.ascontiguousarray(logits), labels.astype(np.int64, copy=False), dlogits
    )
    return float(loss), dlogits
