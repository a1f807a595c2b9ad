"""Data quality of a data set and of its split into worker shards, for teaching.

Makes visible what guides mean by "poor data": rare classes, duplicates, conflicting labels,
dropped rows, constant or badly scaled features, and shards whose class mix strays from the whole.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from worker.data import Dataset, load_dataset
from worker.preprocess import fit_standardizer, standardize
from worker.shards import class_histograms
from worker.shards import partition as make_shards  # `partition` is a parameter name here

__all__ = [
    "EXTREME_Z",
    "Duplicates",
    "FeatureRanges",
    "QualityReport",
    "count_duplicates",
    "data_report",
    "data_report_of",
    "feature_ranges",
    "format_report",
    "save_report",
    "total_variation",
]

# A standardised value this far from 0 means a feature that is nearly constant with rare
# spikes (an image's border pixel): its z-scores are huge, and so are the gradient steps it drives.
EXTREME_Z = 10.0
_LISTED = 10  # indices named in one flag; the rest are counted


# ------------------------------------------------------------------------------ the pieces


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two class mixes given as counts (or shares).

    Each is normalised to sum to 1; the distance is half the L1 distance, in [0, 1]: 0 for
    the same mix, 1 when no class occurs in both. It is the share of examples that would
    have to change class to turn one mix into the other.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(f"total_variation needs two 1-D arrays of one length, got {p.shape}, "
                         f"{q.shape}")
    for name, v in (("p", p), ("q", q)):
        if not np.isfinite(v).all() or (v < 0).any() or v.sum() <= 0:
            raise ValueError(f"total_variation: {name} must be finite counts >= 0 with a "
                             f"positive sum, got {v.tolist()}")
    # min(1, ...): rounding may land a hair above 1 for disjoint mixes.
    return min(1.0, float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum()))


def _row_keys(X: np.ndarray) -> np.ndarray:
    """One opaque value per row, equal exactly when the rows are equal element for element."""
    # + 0 turns -0.0 into +0.0, which compare equal as numbers but not as bytes.
    X = np.ascontiguousarray(X) + X.dtype.type(0)
    return X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()


@dataclass(frozen=True)
class Duplicates:
    """Exact duplicates among training rows (features only, compared element for element)."""

    rows: int  # training rows equal to an earlier training row (rows - distinct rows)
    groups: int  # distinct feature rows that occur two or more times
    conflicting_groups: int  # of those groups, the ones whose rows carry two or more labels
    conflicting_rows: int  # all rows of the conflicting groups: no one label fits them all
    test_in_train: int  # test rows equal to some training row: a leak into evaluation


def count_duplicates(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray) -> Duplicates:
    """Count exact duplicate rows of X_train, those with conflicting labels, and test leaks."""
    if X_train.ndim != 2 or X_train.shape[1] < 1 or y_train.shape != (len(X_train),):
        raise ValueError(f"count_duplicates needs X_train (n, features >= 1) and y_train (n,), "
                         f"got {X_train.shape} and {y_train.shape}")
    keys = _row_keys(X_train)
    _, group, counts = np.unique(keys, return_inverse=True, return_counts=True)
    group = group.ravel()  # NumPy 2.0 and 2.1 shape the inverse like the input
    # Distinct (group, label) pairs: a group with two or more of them has conflicting labels.
    pairs = np.unique(np.stack([group, y_train.astype(np.int64)]), axis=1)
    conflicting = np.bincount(pairs[0], minlength=len(counts)) > 1
    leaks = np.isin(_row_keys(X_test), keys) if len(X_test) else np.zeros(0, dtype=bool)
    return Duplicates(
        rows=int(len(keys) - len(counts)),
        groups=int(np.count_nonzero(counts > 1)),
        conflicting_groups=int(np.count_nonzero(conflicting)),
        conflicting_rows=int(counts[conflicting].sum()),
        test_in_train=int(np.count_nonzero(leaks)),
    )


@dataclass(frozen=True)
class FeatureRanges:
    """Per-feature min and max over the training rows, and a summary of them."""

    mins: list[float]
    maxs: list[float]
    low: float  # smallest value of any feature
    high: float  # largest value of any feature
    narrowest: float  # smallest max - min among non-constant features (0.0 if none)
    widest: float  # largest max - min
    extreme: int  # features with some |value| > EXTREME_Z (after standardising: a z-score)


def feature_ranges(X: np.ndarray) -> FeatureRanges:
    """Summarise the per-feature ranges of a non-empty (n, features) array."""
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"feature_ranges needs a non-empty (n, features) array, got {X.shape}")
    lo = X.min(axis=0).astype(np.float64)
    hi = X.max(axis=0).astype(np.float64)
    span = hi - lo
    varying = span > 0
    return FeatureRanges(
        mins=lo.tolist(),
        maxs=hi.tolist(),
        low=float(lo.min()),
        high=float(hi.max()),
        narrowest=float(span[varying].min()) if varying.any() else 0.0,
        widest=float(span.max()),
        extreme=int(np.count_nonzero(np.maximum(-lo, hi) > EXTREME_Z)),
    )


# ------------------------------------------------------------------------------ the report


@dataclass(frozen=True)
class QualityReport:
    """What is wrong with a data set and its shards; every field is plain JSON data."""

    dataset: str  # the data set's name, e.g. "digits"
    train_rows: int
    test_rows: int
    features: int
    classes: int
    class_counts: list[int]  # training rows per class
    class_shares: list[float]  # class_counts / train_rows
    test_class_counts: list[int]  # test rows per class
    min_class_share: float  # a class below this share of the training rows is flagged
    # Rows load_dataset removed because a feature (or a CSV label) was NaN or ±inf, counted
    # over the whole pool before the train/test split (MNIST: always 0). As the Dataset says.
    dropped_rows: int
    # On the whole data set as loaded, training and test rows together, before the split
    # (its test_in_train is 0: there is no split yet); then on the training split.
    whole_duplicates: Duplicates
    duplicates: Duplicates  # on the training features as loaded (see raw_values)
    constant_features: list[int]  # indices with max == min over the training rows
    standardised: bool  # whether the loaded features were standardised (what workers see)
    raw_values: str  # where the "raw" ranges come from: as loaded, or reconstructed
    raw_ranges: FeatureRanges  # before standardisation
    standardised_ranges: FeatureRanges  # after: z-scores with the training split's statistics
    partition: str  # "iid" or "label_skew"
    workers: int
    alpha: float | None  # label_skew's Dirichlet alpha; None for iid, which ignores it
    seed: int
    shard_sizes: list[int]  # shard w is worker w's
    shard_histograms: list[list[int]]  # (workers, classes): examples per class in each shard
    shard_skew: list[float]  # total variation distance of each shard's mix from the global one
    mean_skew: float  # mean of shard_skew: 0 for a perfect iid split, up to 1
    shard_missing: list[list[int]]  # per shard: training classes it holds no example of
    flags: list[str]  # human-readable warnings; empty when nothing was found

    def as_dict(self) -> dict:
        """The report as plain dicts, lists, ints, floats and strings (json.dumps takes it)."""
        return asdict(self)


def _check_share(min_class_share: float | None, classes: int) -> float:
    if min_class_share is None:
        # Half the share a class would have if all were equally common.
        return 0.5 / classes
    if (
        isinstance(min_class_share, bool)
        or not isinstance(min_class_share, numbers.Real)
        or not 0.0 < min_class_share <= 1.0  # also rejects NaN
    ):
        raise ValueError(f"min_class_share must be a number in (0, 1], got {min_class_share!r}")
    return float(min_class_share)


def _check_dataset(data: Dataset) -> None:
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a worker.data.Dataset, got {type(data).__name__}")
    if data.n_features < 1 or len(data.X_train) < 1:
        raise ValueError(f"data {data.name!r}: needs training rows and features, got "
                         f"X_train {data.X_train.shape}")
    for name in ("X_train", "X_test"):
        if not np.isfinite(getattr(data, name)).all():
            raise ValueError(f"data {data.name!r}: {name} holds NaN or ±inf, which "
                             "load_dataset would have dropped")
    for name in ("y_train", "y_test"):
        y = getattr(data, name)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"data {data.name!r}: {name} must hold integers, got {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= data.n_classes):
            raise ValueError(f"data {data.name!r}: {name} holds labels outside "
                             f"0..{data.n_classes - 1} (n_classes={data.n_classes})")


def _raw_and_standardised(data: Dataset) -> tuple[np.ndarray, np.ndarray, bool, str]:
    """Training features before and after standardisation, whichever way the data came."""
    if not data.mean.any() and (data.std == 1).all():
        # Loaded with standardize=False (or standardising is the identity): these are the
        # raw values, and the loader's standardisation is exactly these two calls.
        mean, std = fit_standardizer(data.X_train)
        note = "as loaded; standardised as load_dataset would"
        return data.X_train, standardize(data.X_train, mean, std), False, note
    raw = data.X_train.astype(np.float64) * data.std + data.mean
    note = "reconstructed as X * std + mean (float32 rounding: ranges are approximate)"
    return raw, data.X_train, True, note


def _listed(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:_LISTED])
    return shown if len(indices) <= _LISTED else f"{shown} and {len(indices) - _LISTED} more"


def _flags(report: QualityReport) -> list[str]:
    """The warnings, in the order a reader would fix them: data first, then shards."""
    flags = []
    if report.dropped_rows:
        flags.append(f"{report.dropped_rows} rows dropped by the loader for NaN or ±inf values")
    for c, (count, share) in enumerate(zip(report.class_counts, report.class_shares,
                                           strict=True)):
        if share < report.min_class_share:
            flags.append(f"class {c} is rare: {count} training rows ({share:.1%}), below "
                         f"{report.min_class_share:.1%}")
    whole, dup = report.whole_duplicates, report.duplicates
    if whole.rows:
        flags.append(f"{whole.rows} rows of the data set repeat an earlier row exactly "
                     f"({whole.groups} distinct rows occur more than once): {dup.rows} of "
                     f"the repeats fall within the training split")
    if whole.conflicting_groups:
        flags.append(f"{whole.conflicting_groups} groups of identical rows carry conflicting "
                     f"labels ({whole.conflicting_rows} rows): no model fits them all")
    if dup.test_in_train:
        flags.append(f"{dup.test_in_train} test rows also occur in the training split: test "
                     "accuracy overstates generalisation")
    if report.constant_features:
        flags.append(f"{len(report.constant_features)} constant features carry no "
                     f"information: {_listed(report.constant_features)}")
    extreme = report.standardised_ranges.extreme
    if extreme:
        z = max(-report.standardised_ranges.low, report.standardised_ranges.high)
        flags.append(f"{extreme} features reach |z| > {EXTREME_Z:g} after standardising (up to "
                     f"{z:.1f}): nearly constant, with occasional spikes")
    for w, missing in enumerate(report.shard_missing):
        if missing:
            which = "class" if len(missing) == 1 else "classes"
            flags.append(f"worker {w}'s shard has no examples of {which} "
                         f"{_listed(missing)} ({len(missing)} of {report.classes})")
    return flags


def data_report_of(
    data: Dataset,
    workers: int = 2,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_class_share: float | None = None,
) -> QualityReport:
    """The quality report of a loaded Dataset split over `workers` by `partition(...)`.

    Takes the data set as load_dataset returns it, standardised or not, or one built by
    hand. Duplicates and constant features are found on the training rows as given (equal
    raw rows stay equal after standardising); raw ranges of a standardised data set are
    reconstructed from its mean and std. workers, partition, alpha and seed go to
    worker.shards.partition, which checks them.
    """
    _check_dataset(data)
    share_floor = _check_share(min_class_share, data.n_classes)
    shards = make_shards(data, workers, partition, alpha=alpha, seed=seed)
    hist = class_histograms(shards, data.n_classes)
    counts = np.bincount(data.y_train, minlength=data.n_classes)
    present = counts > 0
    skew = [total_variation(row, counts) for row in hist]
    raw, z, standardised, note = _raw_and_standardised(data)
    X = data.X_train
    report = QualityReport(
        dataset=data.name,
        train_rows=len(X),
        test_rows=len(data.X_test),
        features=data.n_features,
        classes=data.n_classes,
        class_counts=counts.tolist(),
        class_shares=(counts / len(X)).tolist(),
        test_class_counts=np.bincount(data.y_test, minlength=data.n_classes).tolist(),
        min_class_share=share_floor,
        dropped_rows=int(data.dropped_rows),
        whole_duplicates=count_duplicates(np.concatenate([X, data.X_test]),
                                          np.concatenate([data.y_train, data.y_test]),
                                          X[:0]),
        duplicates=count_duplicates(X, data.y_train, data.X_test),
        constant_features=np.flatnonzero(X.max(axis=0) == X.min(axis=0)).tolist(),
        standardised=standardised,
        raw_values=note,
        raw_ranges=feature_ranges(raw),
        standardised_ranges=feature_ranges(z),
        partition=partition,
        workers=int(workers),
        alpha=float(alpha) if partition == "label_skew" else None,
        seed=int(seed),
        shard_sizes=[len(shard) for shard in shards],
        shard_histograms=hist.tolist(),
        shard_skew=skew,
        mean_skew=float(np.mean(skew)),
        # Only classes the training split holds: one it lacks altogether is flagged as rare.
        shard_missing=[np.flatnonzero(present & (row == 0)).tolist() for row in hist],
        flags=[],  # filled in below, from the finished figures
    )
    return replace(report, flags=_flags(report))


def data_report(
    dataset: str,
    workers: int = 2,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_class_share: float | None = None,
    *,
    test_fraction: float = 0.2,
) -> QualityReport:
    """Load `dataset` by name (see load_dataset) and report on it and its shards.

    `seed` serves both the train/test split and the partition, as a training run uses it,
    so the shards are the ones its workers would get. The data are loaded unstandardised
    and standardised here exactly as the loader would, so both ranges are exact.
    """
    _check_share(min_class_share, 2)  # fail before a slow load; the real floor needs classes
    data = load_dataset(dataset, test_fraction=test_fraction, seed=seed, standardize=False)
    return data_report_of(data, workers, partition, alpha, seed, min_class_share)


# ------------------------------------------------------------------------------ output


def _num(x: float) -> str:
    return f"{x:.4g}"


def format_report(report: QualityReport) -> str:
    """The report as plain text: a few short tables, then the flags."""
    r = report
    lines = [
        f"Data-quality report: {r.dataset}",
        f"  {r.train_rows} training rows, {r.test_rows} test rows, {r.features} features, "
        f"{r.classes} classes",
        f"  rows dropped by the loader for NaN or ±inf: {r.dropped_rows}",
        "",
        f"Classes (training split; below {r.min_class_share:.1%} is flagged)",
        f"  {'class':>5} {'train':>7} {'share':>7} {'test':>6}",
    ]
    for c in range(r.classes):
        lines.append(f"  {c:>5} {r.class_counts[c]:>7} {r.class_shares[c]:>7.1%} "
                     f"{r.test_class_counts[c]:>6}")
    w, d = r.whole_duplicates, r.duplicates
    lines += [
        "",
        "Duplicates (exact, on the features)   data set   training split",
        f"  rows repeating an earlier row      {w.rows:>9} {d.rows:>16}",
        f"  distinct rows occurring 2+ times   {w.groups:>9} {d.groups:>16}",
        f"  of them with conflicting labels    {w.conflicting_groups:>9} "
        f"{d.conflicting_groups:>16}",
        f"  rows in those conflicting groups   {w.conflicting_rows:>9} "
        f"{d.conflicting_rows:>16}",
        f"  test rows also in training         {'':>9} {d.test_in_train:>16}",
        "",
        f"Features (raw values: {r.raw_values})",
        f"  {'':<13} {'low':>9} {'high':>9} {'narrowest':>10} {'widest':>9} "
        f"{f'|v|>{EXTREME_Z:g}':>7}",
    ]
    for label, fr in (("raw", r.raw_ranges), ("standardised", r.standardised_ranges)):
        lines.append(f"  {label:<13} {_num(fr.low):>9} {_num(fr.high):>9} "
                     f"{_num(fr.narrowest):>10} {_num(fr.widest):>9} {fr.extreme:>7}")
    lines.append(f"  constant features: {_listed(r.constant_features) or 'none'}")
    scheme = r.partition if r.alpha is None else f"{r.partition} (alpha {r.alpha:g})"
    lines += [
        "",
        f"Shards: {scheme}, {r.workers} workers, seed {r.seed}",
        "  skew: total variation distance from the global class mix (0 same, 1 disjoint)",
    ]
    # Per-class columns only while they fit on a line; otherwise count the missing classes.
    if r.classes <= 20:
        lines.append(f"  {'shard':<9} {'rows':>6} " + " ".join(f"{c:>5}" for c in
                                                             range(r.classes)) + "   skew")
        for w, row in enumerate(r.shard_histograms):
            lines.append(f"  {f'worker {w}':<9} {r.shard_sizes[w]:>6} "
                         + " ".join(f"{n:>5}" for n in row) + f"  {r.shard_skew[w]:.3f}")
    else:
        lines.append(f"  {'shard':<9} {'rows':>6} {'missing classes':>16}   skew")
        for w, missing in enumerate(r.shard_missing):
            lines.append(f"  {f'worker {w}':<9} {r.shard_sizes[w]:>6} {len(missing):>16}  "
                         f"{r.shard_skew[w]:.3f}")
    lines += [f"  mean skew {r.mean_skew:.3f}", ""]
    if r.flags:
        lines += ["Flags", *(f"  - {flag}" for flag in r.flags)]
    else:
        lines.append("Flags: no problems found")
    return "\n".join(lines) + "\n"


def save_report(report: QualityReport, directory: str | Path) -> list[Path]:
    """Write data_report.json and data_report.txt into `directory` (made if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "data_report.json"
    text_path = directory / "data_report.txt"
    # allow_nan=False: a NaN would write a file that strict JSON readers refuse.
    json_path.write_text(json.dumps(report.as_dict(), indent=2, allow_nan=False) + "\n",
                         encoding="utf-8")
    text_path.write_text(format_report(report), encoding="utf-8")
    return [json_path, text_path]
