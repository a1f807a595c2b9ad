"""Twins of kernels.conv: im2col, col2im and max-pooling, from the definitions, with loops
over windows and NumPy slices (slow and obviously right)."""

import numpy as np


def _out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def im2col(x, k, stride=1, pad=0):
    b, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = _out(h, k, stride, pad), _out(w, k, stride, pad)
    rows = []
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                window = padded[n, :, i * stride : i * stride + k, j * stride : j * stride + k]
                rows.append(window.reshape(-1))  # (c, di, dj) order
    return np.array(rows, x.dtype).reshape(b * oh * ow, c * k * k)


def col2im(cols, x_shape, k, stride=1, pad=0):
    b, c, h, w = x_shape
    oh, ow = _out(h, k, stride, pad), _out(w, k, stride, pad)
    padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), cols.dtype)
    row = 0
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                padded[n, :, i * stride : i * stride + k, j * stride : j * stride + k] += (
                    cols[row].reshape(c, k, k))
                row += 1
    return padded[:, :, pad : pad + h, pad : pad + w].copy()


def maxpool_forward(x, k, stride=None):
    stride = k if stride is None else stride
    b, c, h, w = x.shape
    oh, ow = _out(h, k, stride, 0), _out(w, k, stride, 0)
    out = np.empty((b, c, oh, ow), x.dtype)
    argmax = np.empty((b, c, oh, ow), np.int64)
    for n, ch, i, j in np.ndindex(b, c, oh, ow):
        window = x[n, ch, i * stride : i * stride + k, j * stride : j * stride + k]
        flat = window.reshape(-1)
        nan = np.flatnonzero(np.isnan(flat))
        first = nan[0] if nan.size else int(np.argmax(flat))  # argmax: the first maximum
        di, dj = divmod(first, k)
        out[n, ch, i, j] = flat[first]
        argmax[n, ch, i, j] = (i * stride + di) * w + j * stride + dj
    return out, argmax


def maxpool_backward(grad_out, argmax, x_shape):
    b, c, h, w = x_shape
    out = np.zeros((b, c, h * w), grad_out.dtype)
    for n, ch, i, j in np.ndindex(grad_out.shape):
        out[n, ch, argmax[n, ch, i, j]] += grad_out[n, ch, i, j]
    return out.reshape(x_shape)
