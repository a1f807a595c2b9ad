"""Twin of worker.sequential.Sequential's forward pass: each layer from its definition, in
float64 (im2col and max-pooling from twins.conv), so that finite differences are exact enough
to check every layer's backward."""

import numpy as np

import twins.conv as conv
from worker.layers import Conv2d, Dense, Dropout, Flatten, MaxPool2d, ReLU, Tanh


def forward64(model, params, X):
    """Logits of `model` in evaluation mode (no dropout), computed in float64."""
    h = np.asarray(X, np.float64).reshape(len(X), *model.input_shape)
    for name, layer in zip(model.names, model.layers, strict=True):
        if isinstance(layer, Dense):
            h = h @ params[f"{name}.weight"].astype(np.float64) + params[f"{name}.bias"]
        elif isinstance(layer, Conv2d):
            w = params[f"{name}.weight"].astype(np.float64)
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            oh = (h.shape[2] + 2 * p - k) // s + 1
            ow = (h.shape[3] + 2 * p - k) // s + 1
            cols = conv.im2col(h, k, s, p)  # (batch*oh*ow, in*k*k)
            z = cols @ w.reshape(len(w), -1).T + params[f"{name}.bias"]
            h = z.reshape(len(h), oh, ow, len(w)).transpose(0, 3, 1, 2)
        elif isinstance(layer, ReLU):
            h = np.maximum(h, 0.0)
        elif isinstance(layer, Tanh):
            h = np.tanh(h)
        elif isinstance(layer, MaxPool2d):
            h = conv.maxpool_forward(h, layer.kernel_size, layer.stride)[0]
        elif isinstance(layer, Flatten):
            h = h.reshape(len(h), -1)
        elif not isinstance(layer, Dropout):
            raise TypeError(f"no twin for {layer}")
    return h


def loss64(model, params, X, y):
    """Mean softmax cross-entropy of forward64's logits."""
    z = forward64(model, params, X)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(y)), y].mean()
