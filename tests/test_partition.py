"""Partitioning the training split over workers: iid and Dirichlet label skew.

Checked properties: disjoint, covering, deterministic by seed, sizes, skew, errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from worker.shards import Shard, class_histograms, partition


def all_indices(shards: list[Shard]) -> np.ndarray:
    return np.concatenate([shard.indices for shard in shards])


def mean_class_entropy(shards: list[Shard], n_classes: int) -> float:
    """Mean over workers of the entropy (bits) of the worker's label distribution."""
    hist = class_histograms(shards, n_classes).astype(np.float64)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return float(terms.sum(axis=1).mean())


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
@pytest.mark.parametrize("workers", [1, 2, 3, 7, 16])
def test_shards_are_disjoint_and_cover_every_example(digits, scheme, workers):
    shards = partition(digits, workers, scheme=scheme, seed=workers)
    assert len(shards) == workers and all(len(shard) >= 1 for shard in shards)
    np.testing.assert_array_equal(np.sort(all_indices(shards)), np.arange(len(digits.y_train)))
    for shard in shards:
        assert shard.indices.dtype == np.int64 and shard.y.dtype == np.int64
        np.testing.assert_array_equal(shard.X, digits.X_train[shard.indices])
        np.testing.assert_array_equal(shard.y, digits.y_train[shard.indices])


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_partition_is_deterministic_by_seed(digits, scheme):
    a = partition(digits, 5, scheme=scheme, seed=11)
    b = partition(digits, 5, scheme=scheme, seed=11)
    c = partition(digits, 5, scheme=scheme, seed=12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.indices, y.indices)
    assert not np.array_equal(all_indices(a), all_indices(c))


@pytest.mark.parametrize("workers", [1, 3, 7, 10, 1438])
def test_iid_sizes_differ_by_at_most_one(digits, workers):
    sizes = [len(shard) for shard in partition(digits, workers)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1438


def test_iid_shards_look_like_the_whole(digits):
    hist = class_histograms(partition(digits, 4, seed=0), 10)
    share = hist / hist.sum(axis=1, keepdims=True)
    overall = np.bincount(digits.y_train, minlength=10) / len(digits.y_train)
    assert np.abs(share - overall).max() < 0.05


def test_label_skew_is_more_skewed_than_iid_and_grows_as_alpha_shrinks(digits):
    iid = mean_class_entropy(partition(digits, 10, "iid", seed=0), 10)
    skew = {
        alpha: mean_class_entropy(partition(digits, 10, "label_skew", alpha=alpha, seed=0), 10)
        for alpha in (0.05, 0.5, 100.0)
    }
    assert iid > 3.2  # near log2(10) = 3.32: every worker sees every class
    assert skew[0.05] < skew[0.5] < skew[100.0]
    assert skew[0.5] < iid - 0.5
    assert skew[100.0] > iid - 0.1  # a large alpha approaches iid


def test_label_skew_gives_every_worker_an_example_even_at_tiny_alpha(digits):
    shards = partition(digits, 200, "label_skew", alpha=0.001, seed=0)
    assert min(len(shard) for shard in shards) >= 1
    np.testing.assert_array_equal(np.sort(all_indices(shards)), np.arange(1438))


def test_label_skew_with_one_example_per_worker():
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 0, 0, 1, 1, 2])
    shards = partition((X, y), 6, "label_skew", alpha=0.01, seed=3)
    assert [len(shard) for shard in shards] == [1] * 6
    np.testing.assert_array_equal(np.sort(all_indices(shards)), np.arange(6))


def test_histograms_sum_to_shard_sizes_and_class_counts(digits):
    shards = partition(digits, 6, "label_skew", alpha=0.3, seed=2)
    hist = class_histograms(shards, digits.n_classes)
    assert hist.shape == (6, 10) and hist.dtype == np.int64
    np.testing.assert_array_equal(hist.sum(axis=1), [len(shard) for shard in shards])
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(digits.y_train, minlength=10))
    np.testing.assert_array_equal(hist[2], shards[2].class_histogram(10))


def test_partition_takes_an_x_y_tuple():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=50)
    shards = partition((X, y), 4, seed=1)
    np.testing.assert_array_equal(np.sort(all_indices(shards)), np.arange(50))
    np.testing.assert_array_equal(shards[0].X, X[shards[0].indices])


def test_class_histogram_refuses_labels_beyond_n_classes(digits):
    shard = partition(digits, 1)[0]
    with pytest.raises(ValueError, match="label 9"):
        shard.class_histogram(5)


@pytest.mark.parametrize("workers", [0, -2])
def test_too_few_workers(digits, workers):
    with pytest.raises(ValueError, match="workers must be at least 1"):
        partition(digits, workers)


def test_more_workers_than_examples(digits):
    with pytest.raises(ValueError, match="1439 workers but only 1438 training examples"):
        partition(digits, 1439)


@pytest.mark.parametrize("workers", [2.5, "4", True])
def test_workers_must_be_an_integer(digits, workers):
    with pytest.raises(ValueError, match="workers must be an integer"):
        partition(digits, workers)


def test_unknown_scheme_lists_known_ones(digits):
    with pytest.raises(ValueError, match="unknown partition scheme 'shards': known are iid"):
        partition(digits, 2, scheme="shards")


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "0.5"])
def test_label_skew_needs_a_positive_finite_alpha(digits, alpha):
    with pytest.raises(ValueError, match="alpha"):
        partition(digits, 2, scheme="label_skew", alpha=alpha)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((4, 2)), np.array([0, 1, 0]), "X"),
        (np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0]), "integer labels"),
        (np.zeros((4, 2)), np.array([0, -1, 0, 1]), "labels must be >= 0"),
    ],
)
def test_bad_arrays_are_refused(X, y, match):
    with pytest.raises(ValueError, match=match):
        partition((X, y), 2)


def test_partition_refuses_other_inputs():
    with pytest.raises(TypeError, match="Dataset or an"):
        partition([np.zeros((2, 2)), np.zeros(2, int)], 1)
