"""Partitioning: which training examples each worker holds.

`partition` splits a training split into disjoint shards, one per worker, either iid or
with Dirichlet label skew (the standard non-iid benchmark), deterministically by seed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from worker.dataset import Dataset

__all__ = ["PARTITION_SCHEMES", "Shard", "class_histograms", "partition"]

PARTITION_SCHEMES = ("iid", "label_skew")


# eq=False: the fields are arrays, and a generated __eq__/__hash__ over arrays would raise.
@dataclass(frozen=True, eq=False)
class Shard:
    X: np.ndarray  # (n_shard, n_features), rows of the training split
    y: np.ndarray  # int64 (n_shard,)
    indices: np.ndarray  # int64 (n_shard,): X == train_X[indices], in shuffled order

    def __len__(self) -> int:
        return len(self.indices)

    def class_histogram(self, n_classes: int) -> np.ndarray:
        """Examples per class, int64 (n_classes,)."""
        if self.y.size and int(self.y.max()) >= n_classes:
            raise ValueError(f"shard holds label {int(self.y.max())}, n_classes={n_classes}")
        return np.bincount(self.y, minlength=n_classes)


def class_histograms(shards: list[Shard], n_classes: int) -> np.ndarray:
    """Examples per (worker, class), int64 (workers, n_classes): rows sum to shard sizes."""
    if not shards:
        return np.zeros((0, n_classes), dtype=np.int64)
    return np.stack([shard.class_histogram(n_classes) for shard in shards])


def partition(
    train_set: Dataset | tuple[np.ndarray, np.ndarray],
    workers: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Shard]:
    """Split the training examples into `workers` disjoint shards that cover them all.

    train_set: a Dataset (its training split is used) or an (X, y) pair.
    scheme "iid": a seeded shuffle cut into near-equal shards (sizes differ by at most 1).
    scheme "label_skew": for each class, proportions over workers drawn from
    Dirichlet(alpha, ..., alpha), so smaller alpha gives each worker fewer classes
    (alpha -> infinity approaches iid); `alpha` is ignored by "iid".
    """
    X, y = _arrays(train_set)
    _check_workers(workers, len(y))
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        owner = _iid_owners(len(y), workers, rng)
    elif scheme == "label_skew":
        if not (isinstance(alpha, numbers.Real) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"label_skew needs a finite alpha > 0, got {alpha!r}")
        owner = _dirichlet_owners(y, workers, alpha, rng)
        _give_every_worker_one(owner, y, workers)
    else:
        known = ", ".join(PARTITION_SCHEMES)
        raise ValueError(f"unknown partition scheme {scheme!r}: known are {known}")
    return _shards(X, y, owner, workers, rng)


def _arrays(train_set: Dataset | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(train_set, "X_train"):
        X, y = train_set.X_train, train_set.y_train
    elif isinstance(train_set, tuple) and len(train_set) == 2:
        X, y = np.asarray(train_set[0]), np.asarray(train_set[1])
    else:
        raise TypeError(f"partition takes a Dataset or an (X, y) tuple, got {type(train_set)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(X) != len(y):
        raise ValueError(
            f"partition needs X (n, ...) and integer labels y (n,), got X {X.shape} and "
            f"y {y.dtype} {y.shape}"
        )
    if y.size and y.min() < 0:
        raise ValueError(f"partition: labels must be >= 0, found {int(y.min())}")
    return X, y


def _check_workers(workers: int, n: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)):
        raise ValueError(f"workers must be an integer, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers > n:
        raise ValueError(
            f"{workers} workers but only {n} training examples: every worker needs one"
        )


def _iid_owners(n: int, workers: int, rng: np.random.Generator) -> np.ndarray:
    """owner[i] = the worker that holds example i; a shuffle cut into near-equal runs."""
    owner = np.empty(n, dtype=np.int64)
    for w, run in enumerate(np.array_split(rng.permutation(n), workers)):
        owner[run] = w
    return owner


def _dirichlet_owners(
    y: np.ndarray, workers: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Per class (ascending label): shuffle its examples, cut them at Dirichlet shares."""
    owner = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(workers, alpha))
        # Cut points floor(cumulative share * n_c): the last worker takes the rounding.
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for w, run in enumerate(np.split(members, cuts)):
            owner[run] = w
    return owner


def _give_every_worker_one(owner: np.ndarray, y: np.ndarray, workers: int) -> None:
    """Fix-up so that no shard is empty (a worker with no data cannot take a step).

    Each empty worker, in ascending order, takes one example from the currently largest
    shard (lowest worker id on ties): that shard's most common class (smallest label on
    ties), the example with the highest index. It moves as few examples as possible and
    leaves the skew almost untouched. A donor always has two or more examples, since
    workers <= examples.
    """
    counts = np.bincount(owner, minlength=workers)
    for w in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        held = np.flatnonzero(owner == donor)
        common = int(np.argmax(np.bincount(y[held])))
        owner[held[y[held] == common][-1]] = w
        counts[donor] -= 1
        counts[w] += 1


def _shards(
    X: np.ndarray, y: np.ndarray, owner: np.ndarray, workers: int, rng: np.random.Generator
) -> list[Shard]:
    counts = np.bincount(owner, minlength=workers)
    # Stable sort groups the examples by worker; each group is then shuffled so that a
    # label-skewed shard is not ordered by class.
    groups = np.split(np.argsort(owner, kind="stable"), np.cumsum(counts)[:-1])
    shards = []
    for indices in groups:
        indices = rng.permutation(indices).astype(np.int64)
        shards.append(Shard(X=X[indices], y=y[indices].astype(np.int64), indices=indices))
    return shards
