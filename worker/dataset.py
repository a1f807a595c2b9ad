"""The Dataset: a data set split into train and test arrays, with what loading did to it.

Its own module so that both worker.data (which builds one) and worker.shards (which cuts
one into shards) can import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset"]


# eq=False: the fields are arrays, and a generated __eq__/__hash__ over arrays would raise.
# frozen stops rebinding a field; it does not make the arrays read-only.
@dataclass(frozen=True, eq=False)
class Dataset:
    name: str  # the spec it was loaded from, e.g. "digits" or "csv:runs/iris.csv"
    X_train: np.ndarray  # float32 (n_train, n_features), standardised with train stats
    y_train: np.ndarray  # int64 (n_train,), values in [0, n_classes)
    X_test: np.ndarray  # float32 (n_test, n_features), standardised with the TRAIN stats
    y_test: np.ndarray  # int64 (n_test,)
    n_classes: int
    image_shape: tuple[int, int] | None  # (rows, cols) when rows are flattened images
    dropped_rows: int  # rows removed because they held NaN or ±inf
    mean: np.ndarray  # float32 (n_features,), fit on the training split only (0 if raw)
    std: np.ndarray  # float32 (n_features,), 1 for constant features (and if raw)

    def __post_init__(self) -> None:
        n_features = self.X_train.shape[1] if self.X_train.ndim == 2 else -1
        if (
            self.X_test.ndim != 2
            or self.X_test.shape[1] != n_features
            or self.y_train.shape != (len(self.X_train),)
            or self.y_test.shape != (len(self.X_test),)
            or self.mean.shape != (n_features,)
            or self.std.shape != (n_features,)
        ):
            raise ValueError(
                f"Dataset {self.name!r}: inconsistent shapes X_train {self.X_train.shape}, "
                f"y_train {self.y_train.shape}, X_test {self.X_test.shape}, "
                f"y_test {self.y_test.shape}, mean {self.mean.shape}, std {self.std.shape}"
            )

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])
