"""Sequential: a model made of layers applied in order, with softmax cross-entropy on top.

It names every parameter stably (`conv0.weight`, `dense1.bias`: numbered per layer kind, in
order), checks the layers' shapes against each other once when it is built, and runs the
forward pass, the backward pass and DP-SGD's per-example clipping over any stack of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kernels import softmax_cross_entropy
from worker.layers import Embedding, Layer
from worker.precision import Precision

__all__ = ["Params", "Sequential"]

Params = dict[str, np.ndarray]

_FP32 = Precision("fp32")
# Rows per forward pass in evaluate(): bounds the memory of evaluating a large test set.
_EVAL_CHUNK = 4096


class Sequential:
    """Layers in order; X arrives flat (batch, features) and is seen as (batch, *input_shape).

    input_shape: one example's shape, e.g. (64,) for a dense first layer or (1, 8, 8) for a
    convolution over 8x8 grey images. The last layer must give (n_classes,): the logits.
    seed fixes init_params (one generator, drawn layer by layer, in order).
    """

    def __init__(self, layers: Sequence[Layer], input_shape: Sequence[int], seed: int = 0,
                 spec: str | None = None) -> None:
        self.layers = list(layers)
        self.input_shape = tuple(int(n) for n in input_shape)
        self.seed = seed
        self.spec = spec  # the model spec it was built from (worker/model_spec.py), if any
        if not self.layers:
            raise ValueError("a Sequential model needs at least one layer")
        if not self.input_shape or any(n < 1 for n in self.input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
        self.names: list[str | None] = []  # each layer's parameter prefix (None: no params)
        counts: dict[str, int] = {}
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Embedding) and i > 0:
                raise ValueError(f"layer {i}: an Embedding must be the first layer (its ids "
                                 f"have no gradient to pass back)")
            shape = layer.out_shape(shape)  # raises, naming the layer, on a mismatch
            if layer.kind is None:
                self.names.append(None)
            else:
                self.names.append(f"{layer.kind}{counts.get(layer.kind, 0)}")
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
        if len(shape) != 1:
            raise ValueError(f"the last layer gives shape {shape} per example; a classifier "
                             f"ends in one vector of logits (add Flatten and Dense)")
        self.n_classes = shape[0]
        # Layer i passes a gradient back only if a layer before it has parameters.
        self._need_dx = [any(n is not None for n in self.names[:i])
                         for i in range(len(self.layers))]
        # Each layer's (short name, full name) pairs, and every shape: asked for every step.
        self._keys = [[] if name is None else [(short, f"{name}.{short}")
                                               for short in layer.param_shapes()]
                      for name, layer in zip(self.names, self.layers, strict=True)]
        self._shapes = {full: layer.param_shapes()[short]
                        for keys, layer in zip(self._keys, self.layers, strict=True)
                        for short, full in keys}

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in layer order (weight before bias)."""
        return dict(self._shapes)

    def init_params(self) -> Params:
        """Each layer's start (He-normal weights, zero biases, float32), drawn layer by layer
        from one generator seeded with `seed`, so a seed fixes the model."""
        rng = np.random.default_rng(self.seed)
        params: Params = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            for short, value in layer.init(rng).items():
                params[f"{name}.{short}"] = value
        return params

    def check_dp(self) -> None:
        """Refuse, before training, a model whose per-example gradients DP-SGD cannot clip."""
        for i, layer in enumerate(self.layers):
            if not layer.dp_exact:
                raise ValueError(f"DP-SGD: layer {i} ({layer}) has no exact per-example "
                                 f"gradient clipping in tinyps; remove it or train without "
                                 f"--dp-noise")

    def _check(self, params: Params, X: np.ndarray) -> None:
        missing = [name for name in self._shapes if name not in params]
        if missing:
            raise KeyError(f"params lack {missing}")
        for name, shape in self._shapes.items():
            if params[name].shape != shape:
                raise ValueError(f"{name} has shape {params[name].shape}, the model needs {shape}")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (batch, {self.n_features}), got {X.shape}")

    def _local(self, params: Params, i: int) -> Params:
        """Layer i's parameters by their short names."""
        return {short: params[full] for short, full in self._keys[i]}

    def _forward(self, params: Params, X: np.ndarray, p: Precision = _FP32,
                 train: bool = False) -> tuple[list[object], np.ndarray]:
        """Logits, and each layer's cache (what its backward needs).

        In 16-bit precision each layer rounds the operands of its products and the
        activations it keeps; products accumulate in fp32 (BLAS float32), as tensor cores
        do; the bias add and the loss stay in fp32.
        """
        h = X.reshape(len(X), *self.input_shape)
        caches = []
        for i, layer in enumerate(self.layers):
            h, cache = layer.forward(self._local(params, i), h, p, train)
            caches.append(cache)
        return caches, h

    def loss_and_grads(
        self, params: Params, X: np.ndarray, y: np.ndarray, precision: Precision | None = None,
        loss_scale: float = 1.0, counts: dict[str, int] | None = None,
    ) -> tuple[float, Params]:
        """Mean cross-entropy of the batch (in training mode) and its gradient with respect
        to every parameter.

        precision fp16/bf16: weights, activations, the backward signal and the gradients are
        rounded to 16 bits where hardware would hold them. loss_scale multiplies the loss
        before the backward pass (the gradients come back scaled; the loss does not).
        counts, if given, gains "nonzero" (gradient values, of the parameters and of the
        signals that enter a layer's products, that were not 0 in fp32) and "underflow"
        (those of them that became 0 when held in 16 bits).
        """
        p = precision or _FP32
        X = np.asarray(X, dtype=np.float32)
        self._check(params, X)
        if p.mixed:
            params = {name: p.round(value) for name, value in params.items()}
        caches, logits = self._forward(params, X, p, train=True)
        loss, d = softmax_cross_entropy(logits, y)  # d: (batch, classes)
        if loss_scale != 1.0:
            d *= np.float32(loss_scale)
        grads: Params = {}
        for i in reversed(range(len(self.layers))):
            name = self.names[i]
            if name is not None:
                d = self._held(p, d, counts)  # an operand of this layer's products
            d, local = self.layers[i].backward(self._local(params, i), caches[i], d,
                                               self._need_dx[i])
            for short, grad in local.items():
                grads[f"{name}.{short}"] = self._held(p, grad, counts)
            if d is None:
                break
        return loss, {name: grads[name] for name in self._shapes}

    def clipped_grad_sum(self, params: Params, X: np.ndarray, y: np.ndarray, clip: float
                         ) -> tuple[float, Params, np.ndarray]:
        """DP-SGD's gradient: each example's gradient clipped to L2 norm `clip`, then summed.

        Returns (mean loss, the sum of the clipped per-example gradients, each example's norm
        before clipping). No per-example gradient of a dense layer is ever built (its norm is
        |a_i| |d_i|, kernels.outer_sq_norms); a convolution's are, one (in*k*k, out) matrix
        per example. A parameter gradient is linear in the backward signal, so the clipped
        sum is one ordinary backward step with each example's signal scaled by its factor.
        """
        self.check_dp()
        X = np.asarray(X, dtype=np.float32)
        self._check(params, X)
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if len(X) == 0:  # Poisson sampling can draw an empty batch: its sum is zero
            zeros = {name: np.zeros(shape, np.float32)
                     for name, shape in self.param_shapes().items()}
            return float("nan"), zeros, np.zeros(0)
        caches, logits = self._forward(params, X, train=True)
        loss, d = softmax_cross_entropy(logits, y)
        d *= np.float32(len(X))  # the mean's gradient times B: each example's own gradient
        signals: dict[int, np.ndarray] = {}
        sq_norms = np.zeros(len(X), np.float64)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if self.names[i] is not None:
                signals[i] = d
                layer.sq_norms(caches[i], d, sq_norms)
            if not self._need_dx[i]:
                break
            d, _ = layer.backward(self._local(params, i), caches[i], d, True, need_grads=False)
        norms = np.sqrt(sq_norms)
        # Opacus's factor: clip / (norm + 1e-6), at most 1.
        factors = np.minimum(1.0, clip / (norms + 1e-6)).astype(np.float32)
        grads: Params = {}
        for i, d in sorted(signals.items()):
            scaled = d * factors.reshape(-1, *([1] * (d.ndim - 1)))
            _, local = self.layers[i].backward(self._local(params, i), caches[i], scaled, False)
            for short, grad in local.items():
                grads[f"{self.names[i]}.{short}"] = grad
        return loss, {name: grads[name] for name in self._shapes}, norms

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
        """The model's output in evaluation mode (no dropout), in fp32."""
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

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{inner}], input_shape={self.input_shape})"
