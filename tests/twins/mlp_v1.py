"""The MLP as it was before it became a Sequential (worker/model.py at 9c35e3b), kept
whole so that a test can prove the Sequential gives the same bits: init draws, losses,
gradients in every precision, the underflow counts, and DP-SGD's clipped sums.
"""


from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kernels import bias_relu_forward, outer_sq_norms, relu_backward, softmax_cross_entropy
from worker.precision import Precision

__all__ = ["OldMLP"]

Params = dict[str, np.ndarray]

_FP32 = Precision("fp32")
# Rows per forward pass in evaluate(): bounds the memory of evaluating a large test set.
_EVAL_CHUNK = 4096


class OldMLP:
    """Dense layers with ReLU between them and softmax cross-entropy on top.

    `sizes` lists the widths from input to output, e.g. (64, 128, 10). Layer i holds
    `dense{i}.weight` of shape (in, out) and `dense{i}.bias` of shape (out,).
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes needs an input and an output width, got {sizes}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"every layer width must be >= 1, got sizes {sizes}")
        self.sizes = sizes
        self.seed = seed

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def _fans(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each layer."""
        return [(self.sizes[i], self.sizes[i + 1]) for i in range(self.n_layers)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in layer order (weight before bias)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(self._fans()):
            shapes[f"dense{i}.weight"] = (fan_in, fan_out)
            shapes[f"dense{i}.bias"] = (fan_out,)
        return shapes

    def init_params(self) -> Params:
        """He-normal weights (std sqrt(2 / fan_in), right for ReLU) and zero biases, float32.

        Drawn layer by layer from one generator seeded with `seed`, so a seed fixes the model.
        """
        rng = np.random.default_rng(self.seed)
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(self._fans()):
            std = np.float32(np.sqrt(2.0 / fan_in))
            params[f"dense{i}.weight"] = rng.standard_normal((fan_in, fan_out), np.float32) * std
            params[f"dense{i}.bias"] = np.zeros(fan_out, np.float32)
        return params

    def _check(self, params: Params, X: np.ndarray) -> None:
        missing = [name for name in self.param_shapes() if name not in params]
        if missing:
            raise KeyError(f"params lack {missing}")
        for name, shape in self.param_shapes().items():
            if params[name].shape != shape:
                raise ValueError(f"{name} has shape {params[name].shape}, the model needs {shape}")
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"X must have shape (batch, {self.sizes[0]}), got {X.shape}")

    def _forward(self, params: Params, X: np.ndarray,
                 p: Precision = _FP32) -> tuple[list[np.ndarray], np.ndarray]:
        """Logits, and the input of every layer (the activations backward needs).

        In 16-bit precision the operands of every product and the activations kept for the
        backward pass are rounded to 16 bits; products accumulate in fp32 (BLAS float32), as
        tensor cores do; the bias add and the loss stay in fp32.
        """
        inputs = [p.round(X)]
        h = inputs[0]
        for i in range(self.n_layers):
            z = h @ params[f"dense{i}.weight"]  # (batch, out)
            if i < self.n_layers - 1:
                h = p.round(bias_relu_forward(z, params[f"dense{i}.bias"]))
                inputs.append(h)
            else:
                h = z + params[f"dense{i}.bias"]
        return inputs, h

    def loss_and_grads(
        self, params: Params, X: np.ndarray, y: np.ndarray, precision: Precision | None = None,
        loss_scale: float = 1.0, counts: dict[str, int] | None = None,
    ) -> tuple[float, Params]:
        """Mean cross-entropy of the batch and its gradient with respect to every parameter.

        precision fp16/bf16: weights, activations, the backward signal and the gradients are
        rounded to 16 bits where hardware would hold them. loss_scale multiplies the loss
        before the backward pass (the gradients come back scaled; the loss does not).
        counts, if given, gains "nonzero" (gradient values, of the parameters and of the
        activations, that were not 0 in fp32) and "underflow" (those of them that became 0 when
        held in 16 bits).
        """
        p = precision or _FP32
        X = np.asarray(X, dtype=np.float32)
        self._check(params, X)
        if p.mixed:
            params = {name: p.round(value) for name, value in params.items()}
        inputs, logits = self._forward(params, X, p)
        loss, d = softmax_cross_entropy(logits, y)  # d: (batch, out) of the last layer
        if loss_scale != 1.0:
            d *= np.float32(loss_scale)
        d = self._held(p, d, counts)
        grads: Params = {}
        for i in reversed(range(self.n_layers)):
            grads[f"dense{i}.weight"] = self._held(p, inputs[i].T @ d, counts)  # (in, out)
            grads[f"dense{i}.bias"] = self._held(p, d.sum(axis=0), counts)
            if i > 0:
                # inputs[i] is the ReLU output of layer i-1: its mask gates the gradient.
                d = self._held(p, relu_backward(d @ params[f"dense{i}.weight"].T, inputs[i]),
                               counts)
        return loss, {name: grads[name] for name in self.param_shapes()}

    def clipped_grad_sum(self, params: Params, X: np.ndarray, y: np.ndarray, clip: float
                         ) -> tuple[float, Params, np.ndarray]:
        """DP-SGD's gradient: each example's gradient clipped to L2 norm `clip`, then summed.

        Returns (mean loss, the sum of the clipped per-example gradients, each example's norm
        before clipping). No per-example gradient is ever built: example i's weight gradient
        is the outer product of its layer input a_i and backward signal d_i, whose norm is
        |a_i| |d_i| (kernels.outer_sq_norms); and the clipped sum is a^T (c * d), one matrix
        product with each signal row scaled by its example's clip factor c_i.
        """
        X = np.asarray(X, dtype=np.float32)
        self._check(params, X)
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if len(X) == 0:  # Poisson sampling can draw an empty batch: its sum is zero
            zeros = {name: np.zeros(shape, np.float32)
                     for name, shape in self.param_shapes().items()}
            return float("nan"), zeros, np.zeros(0)
        inputs, logits = self._forward(params, X)
        loss, d = softmax_cross_entropy(logits, y)
        d *= np.float32(len(X))  # the mean's gradient times B: each example's own gradient
        signals = {}
        sq_norms = np.zeros(len(X), np.float64)
        for i in reversed(range(self.n_layers)):
            signals[i] = d
            outer_sq_norms(inputs[i], d, out=sq_norms)  # the weight's share
            sq_norms += np.einsum("ij,ij->i", d, d, dtype=np.float64)  # the bias's share
            if i > 0:
                d = relu_backward(d @ params[f"dense{i}.weight"].T, inputs[i])
        norms = np.sqrt(sq_norms)
        # Opacus's factor: clip / (norm + 1e-6), at most 1.
        factors = np.minimum(1.0, clip / (norms + 1e-6)).astype(np.float32)
        grads: Params = {}
        for i in range(self.n_layers):
            scaled = signals[i] * factors[:, None]
            grads[f"dense{i}.weight"] = inputs[i].T @ scaled
            grads[f"dense{i}.bias"] = scaled.sum(axis=0)
        return loss, grads, norms

    @staticmethod
    def _held(p: Precision, grad: np.ndarray, counts: dict[str, int] | None) -> np.ndarray:
        """A gradient as the format holds it, counting the values that underflow to zero."""
        held = p.round(grad)
        if counts is not None and p.mixed:
            nonzero = grad != 0
            counts["nonzero"] = counts.get("nonzero", 0) + int(nonzero.sum())
            counts["underflow"] = counts.get("underflow", 0) + int((nonzero & (held == 0)).sum())
        return held

    def logits(self, params: Params, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        self._check(params, X)
        return self._forward(params, X)[1]

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """The most likely class of each row of X."""
        return np.argmax(self.logits(params, X), axis=1)

    def evaluate(self, params: Params, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, accuracy) over the whole of X, y."""
        y = np.asarray(y)
        if len(X) == 0:
            raise ValueError("cannot evaluate on an empty set")
        loss_sum = 0.0
        correct = 0
        for start in range(0, len(X), _EVAL_CHUNK):
            logits = self.logits(params, X[start : start + _EVAL_CHUNK])
            labels = y[start : start + _EVAL_CHUNK]
            loss, _ = softmax_cross_entropy(logits, labels)
            loss_sum += loss * len(labels)
            correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        return loss_sum / len(X), correct / len(X)
