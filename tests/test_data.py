"""Data sets and preprocessing: loaders, the stratified split, standardisation, shifts.

Every file-based case writes its own tiny inputs under tmp_path; nothing needs the network.
"""

from __future__ import annotations

import ast
import gzip
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from worker import data as data_module
from worker import dataset as dataset_module
from worker import preprocess as preprocess_module
from worker import shards as shards_module
from worker.data import DataError, Dataset, load_dataset, read_idx, write_idx
from worker.preprocess import (
    augment_shifts,
    drop_nonfinite,
    fit_standardizer,
    standardize,
    stratified_split,
)


@pytest.fixture(scope="module")
def digits_raw() -> Dataset:
    return load_dataset("digits", standardize=False)


# ------------------------------------------------------------------------------ digits


def test_digits_shapes_dtypes_and_classes(digits):
    assert digits.name == "digits"
    assert digits.X_train.shape == (1438, 64) and digits.X_test.shape == (359, 64)
    assert digits.X_train.dtype == np.float32 and digits.X_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    assert digits.n_features == 64 and digits.n_classes == 10
    assert digits.image_shape == (8, 8) and digits.dropped_rows == 0
    assert set(digits.y_train.tolist()) == set(range(10))
    assert set(digits.y_test.tolist()) == set(range(10))
    assert digits.mean.dtype == np.float32 and digits.std.dtype == np.float32
    assert digits.X_train.flags.c_contiguous


def test_digits_raw_pixels_are_scaled_to_unit_range(digits_raw):
    assert digits_raw.X_train.min() == 0.0 and digits_raw.X_train.max() == 1.0
    assert np.all(digits_raw.mean == 0) and np.all(digits_raw.std == 1)


def test_standardisation_uses_training_statistics_only(digits, digits_raw):
    # Same seed, so both loads hold the same rows in the same order.
    np.testing.assert_array_equal(digits.y_train, digits_raw.y_train)
    raw_train, raw_test = digits_raw.X_train, digits_raw.X_test
    np.testing.assert_allclose(digits.mean, raw_train.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(digits.X_train, (raw_train - digits.mean) / digits.std, atol=1e-5)
    np.testing.assert_allclose(digits.X_test, (raw_test - digits.mean) / digits.std, atol=1e-5)
    # Train is centred exactly; test is not, since its own statistics were never used.
    assert np.abs(digits.X_train.mean(axis=0)).max() < 1e-5
    assert np.abs(digits.X_test.mean(axis=0)).max() > 1e-2
    varying = raw_train.max(axis=0) > raw_train.min(axis=0)
    np.testing.assert_allclose(digits.X_train[:, varying].std(axis=0), 1.0, atol=1e-4)


def test_constant_features_get_std_one_and_no_nan(digits, digits_raw):
    constant = digits_raw.X_train.max(axis=0) == digits_raw.X_train.min(axis=0)
    assert constant.any()  # digits has always-blank corner pixels
    assert np.all(digits.std[constant] == 1.0)
    assert np.isfinite(digits.X_train).all() and np.isfinite(digits.X_test).all()
    assert np.all(digits.X_train[:, constant] == 0.0)


def test_fit_standardizer_accumulates_in_float64():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((10_000, 5)) * [1, 10, 1e-3, 5, 0] + 1000).astype(np.float32)
    mean, std = fit_standardizer(X)
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(axis=0), rtol=1e-7)
    want = X.astype(np.float64).std(axis=0)
    np.testing.assert_allclose(std[:4], want[:4], rtol=1e-6)
    assert std[4] == 1.0
    out = standardize(X, mean, std)
    assert out.dtype == np.float32 and out is not X


def test_same_seed_same_split_other_seed_other_split(digits):
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.X_train, digits.X_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)


def test_test_fraction_sets_test_size():
    data = load_dataset("digits", test_fraction=0.5)
    # 898.5 rounds half up, not to even as Python's round() would.
    assert len(data.y_test) == 899 and len(data.y_train) == 898


# ---------------------------------------------------------------------- stratified split


def test_stratified_split_rounding_is_largest_remainder():
    y = np.repeat(np.arange(5), [50, 30, 20, 7, 1])
    train, test = stratified_split(y, 0.2, seed=0)
    # quotas 10, 6, 4, 1.4, 0.2 -> floors 21 of round(21.6) = 22; the extra goes to class 3.
    np.testing.assert_array_equal(np.bincount(y[test], minlength=5), [10, 6, 4, 2, 0])
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))


@pytest.mark.parametrize("seed", range(8))
def test_stratified_split_keeps_every_class_proportion(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, size=int(rng.integers(50, 400)))
    f = float(rng.uniform(0.05, 0.6))
    train, test = stratified_split(y, f, seed=seed)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    counts = np.bincount(y, minlength=7)
    in_test = np.bincount(y[test], minlength=7)
    assert np.all(np.abs(in_test - counts * f) < 1.0)
    assert np.all(np.bincount(y[train], minlength=7)[counts > 0] >= 1)
    assert len(test) == math.floor(len(y) * f + 0.5)


def test_stratified_split_is_repeatable_and_seeded():
    y = np.repeat(np.arange(3), 40)
    a_train, a_test = stratified_split(y, 0.25, seed=5)
    b_train, b_test = stratified_split(y, 0.25, seed=5)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)
    c_train, _ = stratified_split(y, 0.25, seed=6)
    assert not np.array_equal(a_train, c_train)


def test_stratified_split_keeps_a_training_example_of_every_class():
    y = np.array([0, 0, 0, 1, 2, 2])
    train, test = stratified_split(y, 0.5, seed=0)
    assert set(y[train].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.5, -0.1, float("nan"), "0.2", True, None])
def test_bad_test_fraction_is_refused(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.arange(10) % 2, bad)
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=bad)


def test_bad_test_fraction_is_refused_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset(f"csv:{tmp_path / 'missing.csv'}", test_fraction=2.0)


def test_split_that_leaves_test_empty_is_refused():
    with pytest.raises(ValueError, match="empty"):
        stratified_split(np.array([0, 1, 2]), 0.1)


# ----------------------------------------------------------------------- drop_nonfinite


def test_drop_nonfinite_counts_and_keeps_order():
    X = np.array([[1, 2], [np.nan, 0], [3, np.inf], [4, 5], [-np.inf, 1]], dtype=np.float32)
    y = np.array([0.0, 1, 1, np.nan, 2])
    kept_X, kept_y, dropped = drop_nonfinite(X, y)
    assert dropped == 4
    np.testing.assert_array_equal(kept_X, [[1, 2]])
    np.testing.assert_array_equal(kept_y, [0])
    _, _, none = drop_nonfinite(X[[0, 3]], np.array([0, 1]))
    assert none == 0


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed():
    a = load_dataset("synthetic", n_samples=2000, n_features=20, n_classes=4, seed=3)
    b = load_dataset("synthetic", n_samples=2000, n_features=20, n_classes=4, seed=3)
    c = load_dataset("synthetic", n_samples=2000, n_features=20, n_classes=4, seed=4)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_train, c.X_train)


def test_synthetic_shapes_and_classes():
    data = load_dataset("synthetic", n_samples=3000, n_features=40, n_classes=6, seed=0)
    assert data.X_train.shape == (2400, 40) and data.X_test.shape == (600, 40)
    assert data.X_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.n_classes == 6 and data.image_shape is None and data.dropped_rows == 0
    counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=6)
    assert counts.min() > 3000 / 6 / 4  # no class starved: the teacher is near balanced


def test_synthetic_labels_are_not_linearly_trivial():
    # A nearest-class-mean classifier (linear) must do better than chance but not perfectly.
    data = load_dataset("synthetic", n_samples=4000, n_features=16, n_classes=4, seed=0)
    centres = np.stack([data.X_train[data.y_train == c].mean(axis=0) for c in range(4)])
    pred = np.argmin(((data.X_test[:, None, :] - centres) ** 2).sum(axis=2), axis=1)
    accuracy = (pred == data.y_test).mean()
    assert 0.3 < accuracy < 0.99


@pytest.mark.parametrize("kwargs", [{"n_classes": 1}, {"n_samples": 1}, {"n_features": 0}])
def test_synthetic_refuses_degenerate_sizes(kwargs):
    with pytest.raises(ValueError, match="synthetic needs"):
        load_dataset("synthetic", **kwargs)


# ---------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.array([[-300, 2], [5, 30000]], dtype=np.int16),
        np.array([1, -(2**31), 2**31 - 1], dtype=np.int32),
        np.array([[1.5, -0.0], [np.inf, 3e38]], dtype=np.float32),
        np.array([math.pi], dtype=np.float64),
        np.zeros((0, 5), dtype=np.uint8),
    ],
)
def test_idx_round_trip(tmp_path, suffix, array):
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([7, 2], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 2])


def test_write_idx_refuses_dtype_without_code(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.arange(3, dtype=np.int64))


# -------------------------------------------------------------------------------- mnist

MNIST_TRAIN, MNIST_TEST = 30, 12
MNIST_SHAPE = (4, 5)


def write_mnist(folder: Path, gz: bool = False, **override: np.ndarray) -> dict[str, np.ndarray]:
    """Tiny MNIST folder: 30 train and 12 test 4x5 images; `override` swaps any array."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (MNIST_TRAIN, *MNIST_SHAPE), np.uint8),
        "train-labels-idx1-ubyte": np.arange(MNIST_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (MNIST_TEST, *MNIST_SHAPE), np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(MNIST_TEST, dtype=np.uint8) % 10,
    }
    arrays.update({name.replace("_", "-"): a for name, a in override.items()})
    folder.mkdir(exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files_and_keeps_its_own_split(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    raw = load_dataset(f"mnist:{tmp_path}", standardize=False)
    assert raw.image_shape == MNIST_SHAPE and raw.n_classes == 10 and raw.n_features == 20
    assert raw.X_train.dtype == np.float32 and raw.y_train.dtype == np.int64
    want = arrays["train-images-idx3-ubyte"].reshape(MNIST_TRAIN, 20) / np.float32(255)
    np.testing.assert_array_equal(raw.X_train, want)
    np.testing.assert_array_equal(raw.y_test, arrays["t10k-labels-idx1-ubyte"])
    data = load_dataset(f"mnist:{tmp_path}", test_fraction=0.5)  # ignored for MNIST
    assert len(data.y_train) == MNIST_TRAIN and len(data.y_test) == MNIST_TEST
    np.testing.assert_allclose(data.mean, raw.X_train.mean(axis=0), atol=1e-6)
    assert np.abs(data.X_train.mean(axis=0)).max() < 1e-5


def test_mnist_accepts_a_mix_of_plain_and_gz_files(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").rename(tmp_path / "t10k-labels.tmp")
    with gzip.open(tmp_path / "t10k-labels.tmp") as f:
        (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(f.read())
    assert len(load_dataset(f"mnist:{tmp_path}").y_test) == MNIST_TEST


def test_mnist_labels_use_n_classes_as_their_range(tmp_path):
    labels = np.arange(MNIST_TRAIN, dtype=np.uint8) % 20
    write_mnist(tmp_path, train_labels_idx1_ubyte=labels)
    assert load_dataset(f"mnist:{tmp_path}", n_classes=20).n_classes == 20


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")


def test_mnist_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file_says_expected_and_actual_bytes(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    raw = read_idx(tmp_path / name).tobytes()
    header = bytes([0, 0, 8, 3, 0, 0, 0, 30, 0, 0, 0, 4, 0, 0, 0, 5])
    payload = header + raw[:-7]
    opener = gzip.open if gz else open
    with opener(tmp_path / name, "wb") as f:
        f.write(payload)
    with pytest.raises(DataError, match=rf"{name}.*truncated.*expected 600 data bytes, got 593"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_truncated_header(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0]))
    with pytest.raises(DataError, match="truncated IDX header: expected 8 bytes, got 6"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_trailing_bytes_are_refused(tmp_path):
    path = write_idx(tmp_path / "x", np.arange(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing bytes.*expected 4 data bytes, got 5"):
        read_idx(path)


def test_mnist_wrong_magic_names_found_and_expected(tmp_path):
    # Labels where images belong: a 1-D uint8 file has magic 0x801, images need 0x803.
    write_mnist(tmp_path, train_images_idx3_ubyte=np.arange(30, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images.*0x00000801, expected 0x00000803"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_garbage_magic(tmp_path):
    (tmp_path / "x").write_bytes(b"GIF89a-not-idx")
    with pytest.raises(DataError, match="not an IDX magic"):
        read_idx(tmp_path / "x")


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path, t10k_labels_idx1_ubyte=np.zeros(MNIST_TEST - 1, np.uint8))
    with pytest.raises(DataError, match=r"holds 12 images but .* holds 11 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_label_out_of_range_names_value_and_row(tmp_path):
    labels = np.arange(MNIST_TRAIN, dtype=np.uint8) % 10
    labels[7] = 10
    write_mnist(tmp_path, train_labels_idx1_ubyte=labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 10 at row 7"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: not a readable gzip"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_image_size_mismatch_between_splits(tmp_path):
    write_mnist(tmp_path, t10k_images_idx3_ubyte=np.zeros((MNIST_TEST, 5, 4), np.uint8))
    with pytest.raises(DataError, match="train images are"):
        load_dataset(f"mnist:{tmp_path}")


# ---------------------------------------------------------------------------------- csv


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def csv_rows(n: int) -> str:
    """n rows: a = row number (unique, so rows can be found again), label = row % 3."""
    return "".join(f"{i},{i % 3},{-i * 0.5}\n" for i in range(n))


def test_csv_loads_features_and_labels(tmp_path):
    path = write_csv(tmp_path, "a,label,b\n" + csv_rows(30))
    data = load_dataset(f"csv:{path}", standardize=False)
    assert data.name == f"csv:{path}" and data.n_features == 2 and data.n_classes == 3
    assert data.image_shape is None and data.dropped_rows == 0
    X = np.concatenate([data.X_train, data.X_test])
    y = np.concatenate([data.y_train, data.y_test])
    order = np.argsort(X[:, 0])
    np.testing.assert_array_equal(X[order, 0], np.arange(30))
    np.testing.assert_array_equal(X[order, 1], -np.arange(30) * 0.5)
    np.testing.assert_array_equal(y[order], np.arange(30) % 3)


def test_csv_counts_rows_with_nan_and_inf_as_dropped(tmp_path):
    text = (
        "a,label,b\n"
        + csv_rows(30)
        + "1,0,nan\n2,1,inf\n3,2,-inf\n4,,5\n5,NaN,1\n6,1,\n7, 1 , 1e400\n"
    )
    path = write_csv(tmp_path, text)
    data = load_dataset(f"csv:{path}")
    assert data.dropped_rows == 7
    assert len(data.y_train) + len(data.y_test) == 30
    assert np.isfinite(data.X_train).all() and np.isfinite(data.X_test).all()


def test_csv_tolerates_blank_lines_spaces_bom_and_integral_float_labels(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff a , label \n".encode() + b"1, 0\n\n2,1.0\n3,0\n4,1\n")
    data = load_dataset(f"csv:{path}", test_fraction=0.5)
    assert data.n_classes == 2 and len(data.y_train) == 2


def test_csv_wrong_width_names_file_line_and_counts(tmp_path):
    path = write_csv(tmp_path, "a,label,b\n1,0,2\n3,1,4\n5,0\n")
    with pytest.raises(DataError, match=r"data.csv, line 4: expected 3 columns, got 2"):
        load_dataset(f"csv:{path}")


def test_csv_without_label_column(tmp_path):
    path = write_csv(tmp_path, "a,class,b\n1,0,2\n")
    with pytest.raises(DataError, match=r"data.csv: expected one column named 'label'"):
        load_dataset(f"csv:{path}")


def test_csv_with_two_label_columns(tmp_path):
    path = write_csv(tmp_path, "label,a,label\n1,0,2\n")
    with pytest.raises(DataError, match="two or more 'label' columns"):
        load_dataset(f"csv:{path}")


def test_csv_with_only_a_label_column(tmp_path):
    path = write_csv(tmp_path, "label\n1\n0\n")
    with pytest.raises(DataError, match="no feature columns"):
        load_dataset(f"csv:{path}")


def test_csv_non_numeric_cell_names_line_and_column(tmp_path):
    path = write_csv(tmp_path, "a,label,b\n1,0,2\n3,1,four\n")
    with pytest.raises(DataError, match=r"data.csv, line 3: column 'b' holds 'four'"):
        load_dataset(f"csv:{path}")


@pytest.mark.parametrize("label", ["1.5", "-1", "1e9"])
def test_csv_label_that_is_not_a_class_id(tmp_path, label):
    path = write_csv(tmp_path, f"a,label\n1,0\n2,{label}\n3,1\n")
    with pytest.raises(DataError, match=rf"line 3: label '{label}' is not a class id"):
        load_dataset(f"csv:{path}")


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_csv_empty_file_and_header_only(tmp_path):
    empty = write_csv(tmp_path, "", "empty.csv")
    header_only = write_csv(tmp_path, "a,label\n", "header.csv")
    with pytest.raises(DataError, match="empty.csv: empty file"):
        load_dataset(f"csv:{empty}")
    with pytest.raises(DataError, match="header.csv: no data rows"):
        load_dataset(f"csv:{header_only}")


def test_csv_too_few_usable_rows(tmp_path):
    path = write_csv(tmp_path, "a,label\n1,0\nnan,1\n")
    with pytest.raises(DataError, match="1 usable rows"):
        load_dataset(f"csv:{path}")


# ------------------------------------------------------------------------- data set names


@pytest.mark.parametrize("name", ["cifar10", "mnist", "csv:", "digits:extra", "Digits"])
def test_unknown_dataset_lists_known_names(name):
    with pytest.raises(ValueError, match=r"unknown data set.*digits, synthetic, mnist:DIR"):
        load_dataset(name)


# -------------------------------------------------------------------------- augmentation

IMAGE = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
# Each output pixel (r, c) reads input (r + dr, c + dc); 0 where that is off the image.
SHIFTED = {
    "none": IMAGE,
    "up": np.array([[5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 0]], np.float32),
    "down": np.array([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]], np.float32),
    "left": np.array([[2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]], np.float32),
    "right": np.array([[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]], np.float32),
}


def which_shift(image: np.ndarray) -> str:
    matches = [name for name, want in SHIFTED.items() if np.array_equal(image, want)]
    assert len(matches) == 1, f"not a one-pixel shift of IMAGE:\n{image}"
    return matches[0]


def test_augment_shifts_moves_by_one_pixel_and_zero_fills():
    batch = np.tile(IMAGE.reshape(1, 12), (200, 1))
    out = augment_shifts(batch, (3, 4), np.random.default_rng(0))
    assert out.shape == (200, 12) and out.dtype == np.float32
    seen = [which_shift(row.reshape(3, 4)) for row in out]
    assert set(seen) == set(SHIFTED)  # all five directions occur in 200 draws
    np.testing.assert_array_equal(batch, np.tile(IMAGE.reshape(1, 12), (200, 1)))


def test_augment_shifts_accepts_image_arrays_and_is_seeded():
    batch = np.stack([IMAGE] * 16).astype(np.float64)
    a = augment_shifts(batch, (3, 4), np.random.default_rng(7))
    b = augment_shifts(batch, (3, 4), np.random.default_rng(7))
    assert a.shape == (16, 3, 4) and a.dtype == np.float64 and a is not batch
    np.testing.assert_array_equal(a, b)
    for image in a:
        which_shift(image)


def test_augment_shifts_on_digits_keeps_pixels(digits_raw):
    X = digits_raw.X_train[:64]
    out = augment_shifts(X, (8, 8), np.random.default_rng(1))
    # A one-pixel shift keeps every pixel but one edge row or column.
    assert np.all(out.sum(axis=1) <= X.sum(axis=1) + 1e-5)
    assert np.isin(out, X).all()


def test_augment_shifts_empty_batch_and_bad_shape():
    empty = augment_shifts(np.zeros((0, 12), np.float32), (3, 4), np.random.default_rng(0))
    assert empty.shape == (0, 12)
    with pytest.raises(ValueError, match=r"expected images of shape \(n, 12\)"):
        augment_shifts(np.zeros((2, 10)), (3, 4), np.random.default_rng(0))


# ---------------------------------------------------------------------------- layering


@pytest.mark.parametrize(
    "module", [data_module, dataset_module, preprocess_module, shards_module]
)
def test_data_modules_import_only_numpy_sklearn_stdlib(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    allowed = {"numpy", "sklearn", "worker", "__future__"}
    assert not (imported - allowed - set(sys.stdlib_module_names))
