"""The multi-layer perceptron that tinyps trains: a Sequential of Dense layers and ReLUs.

Parameters are a plain dict of named arrays, not attributes of the model, so that they can live
on parameter servers: a worker pulls the dict, asks the model for gradients, and pushes them.
The math lives in worker/layers.py and worker/sequential.py; this file names the shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.layers import Dense, Layer, ReLU
from worker.sequential import Sequential

__all__ = ["MLP"]


class MLP(Sequential):
    """Dense layers with ReLU between them and softmax cross-entropy on top.

    `sizes` lists the widths from input to output, e.g. (64, 128, 10). Layer i holds
    `dense{i}.weight` of shape (in, out) and `dense{i}.bias` of shape (out,).

    forward:  h_{i+1} = ReLU(h_i W_i + b_i);  logits = h_L W_L + b_L
    backward: dW_i = h_i^T d, db_i = sum(d), d <- (d W_i^T) * (h_i > 0)
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes needs an input and an output width, got {sizes}")
        if any(s < 1 for s in sizes):
            raise ValueError(f"every layer width must be >= 1, got sizes {sizes}")
        layers: list[Layer] = []
        for i in range(len(sizes) - 1):
            if i > 0:
                layers.append(ReLU())
            layers.append(Dense(sizes[i], sizes[i + 1]))
        spec = "mlp:" + ",".join(str(s) for s in sizes[1:-1])
        super().__init__(layers, (sizes[0],), seed=seed, spec=spec)
        self.sizes = sizes

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1
