"""Data sets for the workers: load one by name, split it, standardise it.

`load_dataset("digits" | "synthetic" | "mnist:DIR" | "csv:PATH")` returns a `Dataset` of
float32 features and int64 labels (the class is in worker/dataset.py); bad files raise
`DataError` naming the file and the fault. The preprocessing and partition functions are
re-exported, so one import serves a trainer.
"""

from __future__ import annotations

import csv
import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from worker import preprocess  # load_dataset's `standardize` flag shadows the function
from worker.dataset import Dataset
from worker.preprocess import (
    augment_shifts,
    drop_nonfinite,
    fit_standardizer,
    standardize,
    stratified_split,
)
from worker.shards import PARTITION_SCHEMES, Shard, class_histograms, partition

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "load_dataset",
    "read_idx",
    "write_idx",
    # re-exported from worker.dataset, worker.preprocess and worker.shards
    "Dataset",
    "PARTITION_SCHEMES",
    "Shard",
    "augment_shifts",
    "class_histograms",
    "drop_nonfinite",
    "fit_standardizer",
    "partition",
    "standardize",
    "stratified_split",
]

DATASET_NAMES = ("digits", "synthetic", "mnist:DIR", "csv:PATH")


class DataError(ValueError):
    """A data file exists but its contents are wrong (the message names file and fault)."""


# ---------------------------------------------------------------------------- IDX files
# IDX (the MNIST format): magic 0x0000TTNN with TT the element type and NN the number of
# dimensions, then NN big-endian uint32 sizes, then the elements, big-endian, row-major.

_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}
_MNIST_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (n, rows, cols)
_MNIST_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (n,)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        known = ", ".join(str(d) for d in _IDX_CODES)
        raise ValueError(f"write_idx {path}: dtype {array.dtype} has no IDX code ({known})")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx {path}: IDX holds 1 to 255 dimensions, got {array.ndim}")
    header = np.array([(code << 8) | array.ndim, *array.shape], dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_TYPES[code], copy=False).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in .gz) into a native array.

    With `expected_magic` (e.g. 0x00000803 for MNIST images) any other magic is refused.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, no 4-byte magic")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or code not in _IDX_TYPES:
        raise DataError(f"{path}: 0x{magic:08x} is not an IDX magic number (0x0000TTNN)")
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_bytes} bytes, got {len(raw)}"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header_bytes
    if got != expected:
        problem = "truncated IDX file" if got < expected else "IDX file has trailing bytes"
        raise DataError(
            f"{path}: {problem}: header says shape {shape} of {dtype.newbyteorder('=')}, "
            f"expected {expected} data bytes, got {got}"
        )
    data = np.frombuffer(raw, dtype, offset=header_bytes).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from err


# ------------------------------------------------------------------------------ loaders
# Each loader returns raw (X, y) arrays before cleaning: X float, y int64 (CSV: float,
# so that a NaN label counts as a dropped row).


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 1,797 8x8 digits; pixels 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits  # only here: the import costs ~1 s

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


# Hidden width of the synthetic teacher: wide enough that the classes are not linearly
# separable (a linear student cannot reach 100%), narrow enough to be fast at 784 inputs.
_TEACHER_HIDDEN = 32
_TEACHER_CHUNK = 8192  # rows per float64 block: bounds memory at 60,000 x 784


def _make_synthetic(
    n_samples: int, n_features: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """X ~ N(0, 1); y = argmax(tanh(X @ W1) @ W2) for a random teacher fixed by the seed.

    The teacher runs in float64 on the float32 X the student will see, so a near tie
    between two classes cannot flip with the BLAS or the thread count.
    """
    if n_samples < 2 or n_features < 1 or n_classes < 2:
        raise ValueError(
            "synthetic needs n_samples >= 2, n_features >= 1, n_classes >= 2, got "
            f"{n_samples}, {n_features}, {n_classes}"
        )
    # Its own stream, so that the train/test split stays a function of `seed` alone.
    rng = np.random.default_rng([seed, 1])
    X = rng.standard_normal((n_samples, n_features), dtype=np.float32)
    W1 = rng.standard_normal((n_features, _TEACHER_HIDDEN)) / math.sqrt(n_features)
    W2 = rng.standard_normal((_TEACHER_HIDDEN, n_classes))
    W2 /= np.linalg.norm(W2, axis=0)  # equal-norm class vectors keep classes near balanced
    y = np.empty(n_samples, dtype=np.int64)
    for start in range(0, n_samples, _TEACHER_CHUNK):
        block = X[start : start + _TEACHER_CHUNK].astype(np.float64)
        y[start : start + _TEACHER_CHUNK] = (np.tanh(block @ W1) @ W2).argmax(axis=1)
    return X, y


_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", _MNIST_IMAGES_MAGIC),
    "train_labels": ("train-labels-idx1-ubyte", _MNIST_LABELS_MAGIC),
    "test_images": ("t10k-images-idx3-ubyte", _MNIST_IMAGES_MAGIC),
    "test_labels": ("t10k-labels-idx1-ubyte", _MNIST_LABELS_MAGIC),
}


def _load_mnist(
    folder: Path, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """MNIST's own train and test files from `folder`; pixels scaled to [0, 1]."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such MNIST folder")
    arrays = {
        key: read_idx(_find_idx(folder, stem), magic) for key, (stem, magic) in _MNIST_FILES.items()
    }
    X_train, y_train = _mnist_pair(folder, "train", arrays, n_classes)
    X_test, y_test = _mnist_pair(folder, "test", arrays, n_classes)
    if X_train.shape[1:] != X_test.shape[1:]:
        raise DataError(
            f"{folder}: train images are {X_train.shape[1:]} but test images are {X_test.shape[1:]}"
        )
    rows, cols = X_train.shape[1:]
    return (
        X_train.reshape(len(X_train), -1),
        y_train,
        X_test.reshape(len(X_test), -1),
        y_test,
        (rows, cols),
    )


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder / stem}: no such file (nor {stem}.gz) in {folder}")


def _mnist_pair(
    folder: Path, split: str, arrays: dict[str, np.ndarray], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    images_name, _ = _MNIST_FILES[f"{split}_images"]
    labels_name, _ = _MNIST_FILES[f"{split}_labels"]
    if len(images) != len(labels):
        raise DataError(
            f"{folder}: {images_name} holds {len(images)} images but {labels_name} holds "
            f"{len(labels)} labels"
        )
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{folder / labels_name}: label {int(labels[row])} at row {row} is out of range "
            f"0..{n_classes - 1} (n_classes={n_classes})"
        )
    return (images / np.float32(255.0)).astype(np.float32), labels.astype(np.int64)


# A class id above this is almost surely a mislabelled column (an id, a price): it would
# size the model's output layer, so refuse it rather than build a huge model.
_MAX_CSV_CLASSES = 10_000
# Cells read as a missing value (NaN), so that their row is dropped and counted.
_MISSING = {"", "na", "nan", "null", "none"}


def _load_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A header row, a `label` column of class ids 0, 1, ...; every other column a feature."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CSV file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        label_col = _label_column(path, header)
        rows = []
        for row in reader:
            if not row:  # a blank line
                continue
            rows.append(_parse_row(path, reader.line_num, row, header, label_col))
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    table = np.array(rows, dtype=np.float64)
    y = table[:, label_col]
    X = np.delete(table, label_col, axis=1).astype(np.float32)
    return X, y


def _label_column(path: Path, header: list[str]) -> int:
    if not header:
        raise DataError(f"{path}: empty file, expected a header row with a 'label' column")
    if header.count("label") != 1:
        found = "two or more 'label' columns" if "label" in header else f"columns {header}"
        raise DataError(f"{path}: expected one column named 'label', found {found}")
    if len(header) < 2:
        raise DataError(f"{path}: no feature columns besides 'label'")
    return header.index("label")


def _parse_row(
    path: Path, line: int, row: list[str], header: list[str], label_col: int
) -> list[float]:
    if len(row) != len(header):
        raise DataError(f"{path}, line {line}: expected {len(header)} columns, got {len(row)}")
    values = [_parse_cell(path, line, name, cell) for name, cell in zip(header, row, strict=True)]
    label = values[label_col]
    if math.isfinite(label) and (label != int(label) or not 0 <= label < _MAX_CSV_CLASSES):
        raise DataError(
            f"{path}, line {line}: label {row[label_col].strip()!r} is not a class id "
            f"(an integer in 0..{_MAX_CSV_CLASSES - 1})"
        )
    return values


def _parse_cell(path: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"{path}, line {line}: column {column!r} holds {cell!r}, not a number"
        ) from None


# --------------------------------------------------------------------------- the front door


def load_dataset(
    name: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    n_samples: int = 10_000,
    n_features: int = 64,
    n_classes: int = 10,
) -> Dataset:
    """Load a data set by name, drop non-finite rows, split it, and standardise it.

    name: "digits" (scikit-learn's 8x8 digits), "synthetic" (a seeded teacher network of
    n_samples x n_features with n_classes), "mnist:DIR" (the four MNIST IDX files, plain
    or .gz; labels must be in 0..n_classes-1) or "csv:PATH" (a header row and a `label`
    column; n_classes = largest label + 1). n_samples and n_features are used by
    synthetic only; n_classes by synthetic and mnist.
    The split is stratified and seeded by `seed`, except for MNIST, which keeps its own
    60,000/10,000 split and ignores test_fraction. Standardisation fits on the training
    split; with standardize=False the features are left as loaded (mean 0, std 1 recorded).
    """
    kind, _, arg = name.partition(":")
    preprocess.check_test_fraction(test_fraction)  # before any file is read
    image_shape: tuple[int, int] | None = None
    if kind == "mnist" and arg:
        folder = Path(arg).expanduser()
        X_train, y_train, X_test, y_test, image_shape = _load_mnist(folder, n_classes)
        dropped = 0  # uint8 pixels are always finite
        classes = n_classes
    else:
        X, y, classes, image_shape = _load_pool(
            name, seed=seed, n_samples=n_samples, n_features=n_features, n_classes=n_classes
        )
        X, y, dropped = preprocess.drop_nonfinite(X, y)
        if len(y) < 2:
            raise DataError(f"{name}: {len(y)} usable rows, need at least 2 to split")
        y = y.astype(np.int64)
        if kind == "csv":
            classes = int(y.max()) + 1
        train_idx, test_idx = preprocess.stratified_split(y, test_fraction, seed)
        X_train, y_train, X_test, y_test = X[train_idx], y[train_idx], X[test_idx], y[test_idx]
    if standardize:
        mean, std = preprocess.fit_standardizer(X_train)
        X_train = preprocess.standardize(X_train, mean, std)
        X_test = preprocess.standardize(X_test, mean, std)
    else:
        mean = np.zeros(X_train.shape[1], dtype=np.float32)
        std = np.ones(X_train.shape[1], dtype=np.float32)
    return Dataset(
        name=name,
        X_train=np.ascontiguousarray(X_train, dtype=np.float32),
        y_train=y_train,
        X_test=np.ascontiguousarray(X_test, dtype=np.float32),
        y_test=y_test,
        n_classes=classes,
        image_shape=image_shape,
        dropped_rows=dropped,
        mean=mean,
        std=std,
    )


def _load_pool(
    name: str, *, seed: int, n_samples: int, n_features: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[int, int] | None]:
    """The data sets that come as one pool of rows, for load_dataset to split."""
    kind, _, arg = name.partition(":")
    if kind == "digits" and not arg:
        X, y = _load_digits()
        return X, y, 10, (8, 8)
    if kind == "synthetic" and not arg:
        X, y = _make_synthetic(n_samples, n_features, n_classes, seed)
        return X, y, n_classes, None
    if kind == "csv" and arg:
        X, y = _load_csv(Path(arg).expanduser())
        return X, y, 0, None  # n_classes is known once non-finite rows are gone
    known = ", ".join(DATASET_NAMES)
    raise ValueError(f"unknown data set {name!r}: known are {known}")
