"""The layers a Sequential model is made of, each with its forward and backward side by side.

A layer holds no parameters: it says which it needs (`param_shapes`), draws their start
(`init`), and computes with the arrays it is handed, so that parameters can live on servers.
forward returns the output and what backward needs (the cache); backward returns the
input's gradient and the parameters' gradients, by their short names ("weight", "bias").
"""

from __future__ import annotations

import math

import numpy as np

from kernels import (
    col2im,
    conv_out_size,
    im2col,
    maxpool_backward,
    maxpool_forward,
    outer_sq_norms,
    relu_backward,
    relu_forward,
)
from worker.precision import Precision

__all__ = ["Conv2d", "Dense", "Dropout", "Embedding", "Flatten", "Layer", "MaxPool2d", "ReLU",
           "Tanh"]

Shape = tuple[int, ...]  # one example's shape, without the batch
Arrays = dict[str, np.ndarray]


class Layer:
    """What every layer answers. The defaults are those of a layer without parameters."""

    kind: str | None = None  # parameter names' prefix (dense, conv, embed); None: no params
    dp_exact = True  # DP-SGD can clip this layer's per-example gradients exactly

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def param_shapes(self) -> dict[str, Shape]:
        return {}

    def init(self, rng: np.random.Generator) -> Arrays:
        return {}

    def forward(self, params: Arrays, x: np.ndarray, p: Precision, train: bool
                ) -> tuple[np.ndarray, object]:
        raise NotImplementedError

    def backward(self, params: Arrays, cache: object, d: np.ndarray, need_dx: bool,
                 need_grads: bool = True) -> tuple[np.ndarray | None, Arrays]:
        """(the input's gradient, or None unless need_dx; the parameters' gradients, or {}
        when need_grads is False: DP-SGD's first pass wants the signal alone)."""
        raise NotImplementedError

    def sq_norms(self, cache: object, d: np.ndarray, out: np.ndarray) -> None:
        """DP-SGD: add each example's squared gradient norm (of every parameter) to out."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _he_normal(rng: np.random.Generator, shape: Shape, fan_in: int) -> np.ndarray:
    """He-normal: std sqrt(2 / fan_in), right before a ReLU; drawn in float32."""
    return rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))


def _positive(layer: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{layer}: {name} must be an integer >= 1, got {value!r}")


class Dense(Layer):
    """y = x W + b, with W of shape (in, out) as tinyps has always stored it."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int) -> None:
        _positive("Dense", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = int(in_features), int(out_features)

    def out_shape(self, in_shape: Shape) -> Shape:
        if in_shape != (self.in_features,):
            raise ValueError(f"{self}: expects inputs of shape ({self.in_features},), gets "
                             f"{in_shape} (add a Flatten before it, or change in_features)")
        return (self.out_features,)

    def param_shapes(self) -> dict[str, Shape]:
        return {"weight": (self.in_features, self.out_features), "bias": (self.out_features,)}

    def init(self, rng: np.random.Generator) -> Arrays:
        return {"weight": _he_normal(rng, (self.in_features, self.out_features),
                                     self.in_features),
                "bias": np.zeros(self.out_features, np.float32)}

    def forward(self, params, x, p, train):
        x = p.round(x)  # an operand of the product (a no-op when already held in 16 bits)
        return x @ params["weight"] + params["bias"], x  # (batch, out), fp32 bias add

    def backward(self, params, x, d, need_dx, need_grads=True):
        grads = {"weight": x.T @ d, "bias": d.sum(axis=0)} if need_grads else {}  # (in, out)
        return (d @ params["weight"].T if need_dx else None), grads

    def sq_norms(self, x, d, out):
        # Example i's weight gradient is the outer product x_i d_i^T: its norm is |x_i| |d_i|.
        outer_sq_norms(x, d, out=out)
        out += np.einsum("ij,ij->i", d, d, dtype=np.float64)  # the bias's share


class Conv2d(Layer):
    """2-D convolution over NCHW inputs; weight (out_ch, in_ch, k, k) and bias (out_ch,) as
    PyTorch's nn.Conv2d (which computes a cross-correlation, as this does).

    forward: cols = im2col(x) (batch*OH*OW, in*k*k); y = cols W^T + b, one BLAS product.
    backward: dW = D^T cols, db = sum D, dx = col2im(D W), with D the output gradient as
    rows (batch*OH*OW, out).
    """

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0) -> None:
        _positive("Conv2d", in_channels=in_channels, out_channels=out_channels,
                  kernel_size=kernel_size, stride=stride)
        if not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"Conv2d: padding must be an integer >= 0, got {padding!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"{self}: expects inputs of shape ({self.in_channels}, height, "
                             f"width), gets {in_shape}")
        _, h, w = in_shape
        k, s, pad = self.kernel_size, self.stride, self.padding
        if k > h + 2 * pad or k > w + 2 * pad:
            raise ValueError(f"{self}: kernel {k}x{k} is larger than its input {h}x{w} "
                             f"(padded: {h + 2 * pad}x{w + 2 * pad})")
        return (self.out_channels, conv_out_size(h, k, s, pad), conv_out_size(w, k, s, pad))

    def param_shapes(self) -> dict[str, Shape]:
        k = self.kernel_size
        return {"weight": (self.out_channels, self.in_channels, k, k),
                "bias": (self.out_channels,)}

    def init(self, rng: np.random.Generator) -> Arrays:
        fan_in = self.in_channels * self.kernel_size ** 2
        return {"weight": _he_normal(rng, self.param_shapes()["weight"], fan_in),
                "bias": np.zeros(self.out_channels, np.float32)}

    def forward(self, params, x, p, train):
        batch, _, h, w = x.shape
        k, s, pad = self.kernel_size, self.stride, self.padding
        oh, ow = conv_out_size(h, k, s, pad), conv_out_size(w, k, s, pad)
        cols = im2col(p.round(x), k, s, pad)  # (batch*oh*ow, in*k*k): held in 16 bits
        weight = params["weight"].reshape(self.out_channels, -1)  # (out, in*k*k)
        z = cols @ weight.T + params["bias"]  # (batch*oh*ow, out), fp32 accumulate and add
        y = np.ascontiguousarray(z.reshape(batch, oh, ow, self.out_channels).transpose(0, 3, 1, 2))
        return y, (cols, x.shape)

    def _rows(self, d: np.ndarray) -> np.ndarray:
        """The output gradient (batch, out, oh, ow) as rows (batch*oh*ow, out), as cols."""
        return d.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)

    def backward(self, params, cache, d, need_dx, need_grads=True):
        cols, x_shape = cache
        rows = self._rows(d)
        grads = {"weight": (rows.T @ cols).reshape(params["weight"].shape),
                 "bias": rows.sum(axis=0)} if need_grads else {}
        if not need_dx:
            return None, grads
        weight = params["weight"].reshape(self.out_channels, -1)
        dx = col2im(rows @ weight, x_shape, self.kernel_size, self.stride, self.padding)
        return dx, grads

    def sq_norms(self, cache, d, out):
        # As Opacus: example i's weight gradient is U_i^T D_i over its output positions (U_i
        # its unfolded input, D_i its output gradient), and its bias gradient sum_pos D_i.
        cols, x_shape = cache
        batch = x_shape[0]
        unfolded = cols.reshape(batch, -1, cols.shape[1])  # (batch, positions, in*k*k)
        rows = self._rows(d).reshape(batch, -1, self.out_channels)  # (batch, positions, out)
        per_example = np.matmul(unfolded.transpose(0, 2, 1), rows)  # (batch, in*k*k, out)
        out += np.einsum("bij,bij->b", per_example, per_example, dtype=np.float64)
        bias = rows.sum(axis=1)  # (batch, out)
        out += np.einsum("ij,ij->i", bias, bias, dtype=np.float64)


class ReLU(Layer):
    """max(x, 0); backward lets the gradient through where the output is positive."""

    def forward(self, params, x, p, train):
        y = p.round(relu_forward(x))  # kept for backward: held in 16 bits
        return y, y

    def backward(self, params, y, d, need_dx, need_grads=True):
        return relu_backward(d, y), {}


class Tanh(Layer):
    """tanh(x); backward d (1 - y^2) from the output y, as PyTorch's tanh_backward."""

    def forward(self, params, x, p, train):
        y = p.round(np.tanh(x))
        return y, y

    def backward(self, params, y, d, need_dx, need_grads=True):
        return d * (np.float32(1) - y * y), {}


class MaxPool2d(Layer):
    """The max of each k x k window (stride k unless given, no padding, floor as PyTorch);
    backward sends each window's gradient to the position of its maximum."""

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        _positive("MaxPool2d", kernel_size=kernel_size)
        self.kernel_size = int(kernel_size)
        self.stride = self.kernel_size if stride is None else int(stride)
        _positive("MaxPool2d", stride=self.stride)

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ValueError(f"{self}: expects inputs of shape (channels, height, width), "
                             f"gets {in_shape}")
        c, h, w = in_shape
        k, s = self.kernel_size, self.stride
        if k > h or k > w:
            raise ValueError(f"{self}: window {k}x{k} is larger than its input {h}x{w}")
        return (c, conv_out_size(h, k, s, 0), conv_out_size(w, k, s, 0))

    def forward(self, params, x, p, train):
        y, argmax = maxpool_forward(x, self.kernel_size, self.stride)
        return y, (argmax, x.shape)

    def backward(self, params, cache, d, need_dx, need_grads=True):
        argmax, x_shape = cache
        return maxpool_backward(np.ascontiguousarray(d), argmax, x_shape), {}


class Flatten(Layer):
    """(batch, ...) -> (batch, features), row-major as PyTorch's nn.Flatten."""

    def out_shape(self, in_shape: Shape) -> Shape:
        return (math.prod(in_shape),)

    def forward(self, params, x, p, train):
        return x.reshape(len(x), -1), x.shape

    def backward(self, params, x_shape, d, need_dx, need_grads=True):
        return d.reshape(x_shape), {}


class Dropout(Layer):
    """Inverted dropout, as PyTorch's nn.Dropout: in training each value is zeroed with
    probability p and the rest scaled by 1/(1-p); in evaluation it is the identity.

    The masks come from the layer's own generator (seeded), so a run is repeatable; every
    process that builds the model with the same seed draws the same masks.
    """

    dp_exact = False  # a random mask per example is fine, but left out of DP-SGD for now

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def mask(self, shape: Shape) -> np.ndarray:
        """The next keep-mask, already scaled: 1/(1-p) where kept, 0 where dropped."""
        keep = self._rng.random(shape, np.float32) >= np.float32(self.p)
        return keep.astype(np.float32) / np.float32(1.0 - self.p)

    def forward(self, params, x, p, train, mask: np.ndarray | None = None):
        if not train or self.p == 0.0:
            return x, None
        mask = self.mask(x.shape) if mask is None else mask
        return p.round(x * mask), mask

    def backward(self, params, mask, d, need_dx, need_grads=True):
        return (d if mask is None else d * mask), {}


class Embedding(Layer):
    """Rows of a table: integer ids (batch, n) -> vectors (batch, n, dim), as PyTorch's
    nn.Embedding (weight (num, dim), drawn from N(0, 1)). The ids arrive as the features of
    X (whole numbers held as float32); the gradient is a dense (num, dim) array for now.
    It must be the first layer: ids have no gradient.
    """

    kind = "embed"
    dp_exact = False  # one table row may take several of an example's rows

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        _positive("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)

    def out_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ValueError(f"{self}: expects a flat row of ids per example, gets {in_shape}")
        return (in_shape[0], self.embedding_dim)

    def param_shapes(self) -> dict[str, Shape]:
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def init(self, rng: np.random.Generator) -> Arrays:
        return {"weight": rng.standard_normal((self.num_embeddings, self.embedding_dim),
                                              np.float32)}

    def _ids(self, x: np.ndarray) -> np.ndarray:
        ids = x.astype(np.int64)
        if not np.array_equal(ids, x) or (ids.size and (ids.min() < 0
                                                        or ids.max() >= self.num_embeddings)):
            raise ValueError(f"{self}: ids must be whole numbers in 0..{self.num_embeddings - 1}")
        return ids

    def forward(self, params, x, p, train):
        ids = self._ids(x)
        return params["weight"][ids], ids  # (batch, n, dim)

    def backward(self, params, ids, d, need_dx, need_grads=True):
        grad = np.zeros(params["weight"].shape, np.float32)
        np.add.at(grad, ids.reshape(-1), d.reshape(-1, self.embedding_dim))
        return None, {"weight": grad}
