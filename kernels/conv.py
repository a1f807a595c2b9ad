"""Convolution and max-pooling pieces: im2col and col2im around a BLAS matmul, and the pool.

A convolution is a matrix product once every receptive field is unrolled into a row
(im2col); its input gradient folds those rows back, adding where fields overlap (col2im).
Max-pooling keeps the position of each window's maximum, so that backward routes the
gradient there alone. Arrays are NCHW float32, as PyTorch's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["col2im", "conv_out_size", "im2col", "maxpool_backward", "maxpool_forward"]


@njit(cache=True, nogil=True)
def _im2col(x, k, stride, pad, oh, ow, cols):
    """cols[(b, i, j), (c, di, dj)] = x[b, c, i*stride - pad + di, j*stride - pad + dj],
    0 where that falls in the padding.

    Twin: twins.conv.im2col. Rows ordered (batch, out row, out col) and columns (channel,
    kernel row, kernel col), so a weight (out, in, k, k) reshaped to (out, in*k*k) is the
    other operand as it is.
    """
    batch, channels, height, width = x.shape
    for b in range(batch):
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for c in range(channels):
                    for di in range(k):
                        h = i * stride - pad + di
                        for dj in range(k):
                            w = j * stride - pad + dj
                            col = (c * k + di) * k + dj
                            if 0 <= h < height and 0 <= w < width:
                                cols[row, col] = x[b, c, h, w]
                            else:
                                cols[row, col] = 0.0


@njit(cache=True, nogil=True)
def _col2im(cols, k, stride, pad, oh, ow, out):
    """The adjoint of _im2col: out[b, c, h, w] += every cols entry that im2col copied from
    there (padding entries are dropped). out must start at zero.

    Twin: twins.conv.col2im. Same loop order as _im2col, so each sum is taken in one fixed
    order and the result is deterministic.
    """
    batch, channels, height, width = out.shape
    for b in range(batch):
        for i in range(oh):
            for j in range(ow):
                row = (b * oh + i) * ow + j
                for c in range(channels):
                    for di in range(k):
                        h = i * stride - pad + di
                        if h < 0 or h >= height:
                            continue
                        for dj in range(k):
                            w = j * stride - pad + dj
                            if 0 <= w < width:
                                out[b, c, h, w] += cols[row, (c * k + di) * k + dj]


@njit(cache=True, nogil=True)
def _maxpool_forward(x, k, stride, oh, ow, out, argmax):
    """out[b, c, i, j] = the max of x over window (i, j); argmax = its flat index h*W + w in
    the plane.

    Twin: twins.conv.maxpool_forward. As PyTorch's CPU kernel: the first maximum in
    row-major order wins a tie, and a NaN wins over any number (it propagates).
    """
    batch, channels, height, width = x.shape
    for b in range(batch):
        for c in range(channels):
            for i in range(oh):
                for j in range(ow):
                    h0 = i * stride
                    w0 = j * stride
                    best = x[b, c, h0, w0]
                    where = h0 * width + w0
                    for di in range(k):
                        for dj in range(k):
                            v = x[b, c, h0 + di, w0 + dj]
                            if v > best or (v != v and best == best):
                                best = v
                                where = (h0 + di) * width + w0 + dj
                    out[b, c, i, j] = best
                    argmax[b, c, i, j] = where


@njit(cache=True, nogil=True)
def _maxpool_backward(grad_out, argmax, out):
    """out[b, c] (a flat plane) += grad_out at each window's argmax. out must start at zero.

    Twin: twins.conv.maxpool_backward. Windows that overlap (stride < k) add up.
    """
    batch, channels, oh, ow = grad_out.shape
    for b in range(batch):
        for c in range(channels):
            for i in range(oh):
                for j in range(ow):
                    out[b, c, argmax[b, c, i, j]] += grad_out[b, c, i, j]


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length along one axis, as PyTorch's floor((size + 2 pad - k) / stride) + 1."""
    return (size + 2 * pad - k) // stride + 1


def _check_x(x: np.ndarray, name: str = "x") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(f"{name} must be a float32 array of shape (batch, channels, height, "
                         f"width), got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{getattr(x, 'shape', '')}")


def _check_window(k: int, stride: int, pad: int, height: int, width: int) -> tuple[int, int]:
    if k < 1 or stride < 1 or pad < 0:
        raise ValueError(f"need kernel >= 1, stride >= 1, padding >= 0; got kernel {k}, "
                         f"stride {stride}, padding {pad}")
    if k > height + 2 * pad or k > width + 2 * pad:
        raise ValueError(f"kernel {k} is larger than the padded input "
                         f"{height + 2 * pad}x{width + 2 * pad}")
    return conv_out_size(height, k, stride, pad), conv_out_size(width, k, stride, pad)


def im2col(x: np.ndarray, k: int, stride: int = 1, pad: int = 0) -> np.ndarray:
    """x (batch, C, H, W) -> columns (batch*OH*OW, C*k*k): each receptive field as a row."""
    _check_x(x)
    batch, channels, height, width = x.shape
    oh, ow = _check_window(k, stride, pad, height, width)
    cols = np.empty((batch * oh * ow, channels * k * k), np.float32)
    _im2col(np.ascontiguousarray(x), k, stride, pad, oh, ow, cols)
    return cols


def col2im(cols: np.ndarray, x_shape: tuple[int, int, int, int], k: int, stride: int = 1,
           pad: int = 0) -> np.ndarray:
    """The adjoint of im2col: columns (batch*OH*OW, C*k*k) summed back into x_shape."""
    batch, channels, height, width = x_shape
    oh, ow = _check_window(k, stride, pad, height, width)
    want = (batch * oh * ow, channels * k * k)
    if not isinstance(cols, np.ndarray) or cols.dtype != np.float32 or cols.shape != want:
        raise ValueError(f"cols must be float32 of shape {want} for input {tuple(x_shape)}, "
                         f"got {getattr(cols, 'dtype', type(cols).__name__)} "
                         f"{getattr(cols, 'shape', '')}")
    out = np.zeros(x_shape, np.float32)
    _col2im(np.ascontiguousarray(cols), k, stride, pad, oh, ow, out)
    return out


def maxpool_forward(x: np.ndarray, k: int, stride: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Max over k x k windows (stride defaults to k, no padding, floor as PyTorch):
    (out (batch, C, OH, OW), argmax of the same shape, int64 flat indices into each plane)."""
    _check_x(x)
    stride = k if stride is None else stride
    batch, channels, height, width = x.shape
    oh, ow = _check_window(k, stride, 0, height, width)
    out = np.empty((batch, channels, oh, ow), np.float32)
    argmax = np.empty((batch, channels, oh, ow), np.int64)
    _maxpool_forward(np.ascontiguousarray(x), k, stride, oh, ow, out, argmax)
    return out, argmax


def maxpool_backward(grad_out: np.ndarray, argmax: np.ndarray,
                     x_shape: tuple[int, int, int, int]) -> np.ndarray:
    """The gradient of maxpool_forward's input: each grad_out value goes to its argmax."""
    _check_x(grad_out, "grad_out")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int64 \
            or argmax.shape != grad_out.shape:
        raise ValueError(f"argmax must be int64 of grad_out's shape {grad_out.shape}, got "
                         f"{getattr(argmax, 'dtype', type(argmax).__name__)} "
                         f"{getattr(argmax, 'shape', '')}")
    batch, channels, height, width = x_shape
    if (batch, channels) != grad_out.shape[:2]:
        raise ValueError(f"grad_out {grad_out.shape} does not match input shape {x_shape}")
    if argmax.size and (argmax.min() < 0 or argmax.max() >= height * width):
        raise ValueError(f"argmax holds indices outside a {height}x{width} plane")
    out = np.zeros((batch, channels, height * width), np.float32)
    _maxpool_backward(np.ascontiguousarray(grad_out), np.ascontiguousarray(argmax), out)
    return out.reshape(x_shape)
