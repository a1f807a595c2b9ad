"""The data-quality report: exact counts on a hand-built data set with known faults, digits.

The toy data set plants each fault once (duplicates, a conflicting pair, a constant feature,
a rare class, a test leak, dropped rows), so every count in the report has a known answer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from worker.data import Dataset, load_dataset
from worker.quality import (
    QualityReport,
    count_duplicates,
    data_report,
    data_report_of,
    format_report,
    save_report,
    total_variation,
)
from worker.shards import partition


def make_dataset(X_train, y_train, X_test, y_test, n_classes, dropped=0, name="toy") -> Dataset:
    n_features = np.asarray(X_train).shape[1]
    return Dataset(
        name=name,
        X_train=np.asarray(X_train, dtype=np.float32),
        y_train=np.asarray(y_train, dtype=np.int64),
        X_test=np.asarray(X_test, dtype=np.float32).reshape(-1, n_features),
        y_test=np.asarray(y_test, dtype=np.int64),
        n_classes=n_classes,
        image_shape=None,
        dropped_rows=dropped,
        mean=np.zeros(n_features, dtype=np.float32),  # raw, as load_dataset(standardize=False)
        std=np.ones(n_features, dtype=np.float32),
    )


A = [100.0, 0.0, 7.0, 0.0]  # occurs 3 times, always class 0: duplicates, no conflict
B = [200.0, 1.0, 7.0, 1.0]  # occurs twice, as class 0 and class 1: a conflict
C = [300.0, 2.0, 7.0, 2.0]  # the only row of class 2: rare, and one shard must lack it


@pytest.fixture(scope="module")
def toy() -> Dataset:
    # 38 distinct rows (feature 0 = i keeps them apart); feature 2 is 7 everywhere.
    unique = [[float(i), float(i * 3 % 5), 7.0, -float(i)] for i in range(38)]
    X = [*unique, A, A, A, B, B, C]
    y = [0] * 19 + [1] * 19 + [0, 0, 0, 0, 1, 2]
    return make_dataset(X, y, [A, [9.0, 9.0, 9.0, 9.0]], [0, 1], n_classes=3, dropped=5)


@pytest.fixture(scope="module")
def toy_report(toy) -> QualityReport:
    return data_report_of(toy, workers=2, partition="iid", seed=0)


@pytest.fixture(scope="module")
def digits_iid() -> QualityReport:
    return data_report("digits", workers=4, partition="iid", seed=0)


@pytest.fixture(scope="module")
def digits_skew() -> QualityReport:
    return data_report("digits", workers=4, partition="label_skew", alpha=0.1, seed=0)


def plain_json_types(value) -> bool:
    """True if value is built only of dict/list/str/int/float/bool/None (no NumPy scalars)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_json_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_json_types(v) for v in value)
    return type(value) in (str, int, float, bool, type(None))


# -------------------------------------------------------------------------- the skew measure


def test_total_variation_is_0_for_the_same_mix_and_1_for_disjoint_ones():
    assert total_variation([3, 1, 0], [3, 1, 0]) == 0.0
    assert total_variation([30, 10, 0], [3, 1, 0]) == 0.0  # counts are normalised
    assert total_variation([5, 0, 0], [0, 2, 7]) == 1.0
    assert total_variation([1, 1], [1, 0]) == 0.5
    assert total_variation([1, 0, 0, 0], [0, 1, 1, 2]) == 1.0


@pytest.mark.parametrize(
    "p, q",
    [([0, 0], [1, 1]), ([1, -1], [1, 1]), ([1, 2], [1, 2, 3]), ([math.nan, 1], [1, 1])],
)
def test_total_variation_refuses_what_is_not_a_mix(p, q):
    with pytest.raises(ValueError, match="total_variation"):
        total_variation(p, q)


# ----------------------------------------------------------------------- the hand-built data


def test_duplicates_and_conflicts_are_counted_exactly(toy_report):
    dup = toy_report.duplicates
    assert dup.rows == 3  # A twice more, B once more
    assert dup.groups == 2  # A and B
    assert dup.conflicting_groups == 1  # B
    assert dup.conflicting_rows == 2
    assert dup.test_in_train == 1  # the test copy of A
    whole = toy_report.whole_duplicates  # before the split: the test copy is a fourth repeat
    assert (whole.rows, whole.groups, whole.conflicting_groups, whole.test_in_train) == (4, 2, 1, 0)


def test_negative_zero_counts_as_a_duplicate_of_zero():
    X = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    dup = count_duplicates(X, np.array([0, 1, 1]), np.zeros((0, 2), dtype=np.float32))
    assert (dup.rows, dup.groups, dup.conflicting_groups, dup.conflicting_rows) == (1, 1, 1, 2)
    assert dup.test_in_train == 0


def test_counts_shape_and_the_loaders_dropped_rows(toy_report):
    r = toy_report
    assert (r.train_rows, r.test_rows, r.features, r.classes) == (44, 2, 4, 3)
    assert r.class_counts == [23, 20, 1]
    assert r.class_shares == pytest.approx([23 / 44, 20 / 44, 1 / 44])
    assert r.test_class_counts == [1, 1, 0]
    assert r.dropped_rows == 5
    assert r.constant_features == [2]
    assert not r.standardised


def test_feature_ranges_before_and_after_standardising(toy_report):
    raw = toy_report.raw_ranges
    assert raw.mins == [0.0, 0.0, 7.0, -37.0]
    assert raw.maxs == [300.0, 4.0, 7.0, 2.0]
    assert (raw.low, raw.high, raw.narrowest, raw.widest) == (-37.0, 300.0, 4.0, 300.0)
    z = toy_report.standardised_ranges
    assert z.mins[2] == z.maxs[2] == 0.0  # the constant feature becomes 0, not NaN
    assert z.high < 10 and z.extreme == 0


def test_flags_name_each_planted_fault(toy_report):
    flags = "\n".join(toy_report.flags)
    assert "5 rows dropped" in flags
    assert "class 2 is rare: 1 training rows (2.3%)" in flags
    assert "class 0 is rare" not in flags and "class 1 is rare" not in flags
    # The test copy of A makes the data set's fourth repeat; three fall within training.
    assert ("4 rows of the data set repeat an earlier row exactly (2 distinct rows occur more "
            "than once): 3 of the repeats fall within the training split") in flags
    assert "1 groups of identical rows carry conflicting labels (2 rows)" in flags
    assert "1 test rows also occur in the training split" in flags
    assert "1 constant features carry no information: 2" in flags


def test_a_shard_without_the_rare_class_is_flagged_by_name(toy, toy_report):
    # Class 2 has one training row, so exactly one of two shards lacks it.
    shards = partition(toy, 2, "iid", seed=0)
    lacking = [w for w, shard in enumerate(shards) if 2 not in shard.y]
    assert len(lacking) == 1
    w = lacking[0]
    assert toy_report.shard_missing[w] == [2] and toy_report.shard_missing[1 - w] == []
    assert toy_report.shard_histograms[w][2] == 0
    assert f"worker {w}'s shard has no examples of class 2 (1 of 3)" in toy_report.flags
    assert not any(f"worker {1 - w}'s shard" in flag for flag in toy_report.flags)


def test_the_skew_of_each_shard_is_its_distance_from_the_global_mix(toy_report):
    for row, skew in zip(toy_report.shard_histograms, toy_report.shard_skew, strict=True):
        assert skew == total_variation(row, toy_report.class_counts)
    assert toy_report.mean_skew == pytest.approx(np.mean(toy_report.shard_skew))
    assert sum(toy_report.shard_sizes) == toy_report.train_rows


def test_one_worker_holds_the_global_mix_so_its_skew_is_0(toy):
    report = data_report_of(toy, workers=1)
    assert report.shard_skew == [0.0] and report.mean_skew == 0.0
    assert report.shard_missing == [[]]


def test_min_class_share_sets_the_floor(toy):
    assert not any("is rare" in f for f in data_report_of(toy, min_class_share=0.01).flags)
    rare = [f for f in data_report_of(toy, min_class_share=0.5).flags if "is rare" in f]
    assert len(rare) == 2 and "class 1 is rare" in rare[0] and "class 2 is rare" in rare[1]


def test_a_clean_data_set_reports_no_problems():
    X = [[float(i), float(i % 3)] for i in range(8)]
    clean = make_dataset(X, [0, 1] * 4, [[50.0, 1.0]], [1], n_classes=2)
    report = data_report_of(clean, workers=1)
    assert report.flags == []
    assert format_report(report).rstrip().endswith("Flags: no problems found")


def test_a_standardised_data_set_gets_its_raw_ranges_back(toy):
    mean = np.array([10.0, 2.0, 7.0, -5.0], dtype=np.float32)
    std = np.array([100.0, 2.0, 1.0, 10.0], dtype=np.float32)
    z = make_dataset((toy.X_train - mean) / std, toy.y_train, (toy.X_test - mean) / std,
                     toy.y_test, n_classes=3, dropped=5)
    z = Dataset(**{**vars(z), "mean": mean, "std": std})
    report = data_report_of(z, workers=2)
    assert report.standardised and "reconstructed" in report.raw_values
    assert report.raw_ranges.mins == pytest.approx([0.0, 0.0, 7.0, -37.0], abs=1e-4)
    assert report.raw_ranges.maxs == pytest.approx([300.0, 4.0, 7.0, 2.0], abs=1e-4)
    assert report.constant_features == [2]
    assert report.duplicates.rows == 3 and report.duplicates.conflicting_groups == 1


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"workers": 0}, "workers"),
        ({"workers": 45}, "workers"),
        ({"partition": "round_robin"}, "partition scheme"),
        ({"partition": "label_skew", "alpha": 0.0}, "alpha"),
        ({"min_class_share": 0.0}, "min_class_share"),
        ({"min_class_share": 1.5}, "min_class_share"),
        ({"min_class_share": math.nan}, "min_class_share"),
        ({"min_class_share": True}, "min_class_share"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(toy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data_report_of(toy, **kwargs)


def test_bad_data_is_refused(toy):
    with pytest.raises(TypeError, match="Dataset"):
        data_report_of((toy.X_train, toy.y_train))  # type: ignore[arg-type]
    wrong = Dataset(**{**vars(toy), "y_train": toy.y_train + 1})  # label 3 of 3 classes
    with pytest.raises(ValueError, match="y_train"):
        data_report_of(wrong)
    nan = toy.X_train.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="X_train"):
        data_report_of(Dataset(**{**vars(toy), "X_train": nan}))


def test_an_unknown_data_set_name_is_refused_before_anything_else():
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        data_report("nope")
    with pytest.raises(ValueError, match="min_class_share"):
        data_report("nope", min_class_share=2.0)


# ------------------------------------------------------------------------------ digits


def test_digits_facts(digits_iid):
    r = digits_iid
    assert (r.train_rows, r.test_rows, r.features, r.classes) == (1438, 359, 64, 10)
    assert r.dropped_rows == 0
    assert r.duplicates.rows == 0 and r.duplicates.test_in_train == 0
    assert r.constant_features == [0, 32, 39]  # pixels that are blank in every image
    assert (r.raw_ranges.low, r.raw_ranges.high) == (0.0, 1.0)
    assert r.standardised_ranges.high > 10 and r.standardised_ranges.extreme > 0
    assert not any("is rare" in flag for flag in r.flags)


def test_digits_iid_shards_hold_every_class_and_barely_skew(digits_iid):
    assert digits_iid.shard_missing == [[], [], [], []]
    assert not any("shard" in flag for flag in digits_iid.flags)
    assert digits_iid.mean_skew < 0.1


def test_digits_label_skew_shards_skew_and_lack_classes(digits_iid, digits_skew):
    assert digits_skew.mean_skew > 0.3
    assert digits_skew.mean_skew > 5 * digits_iid.mean_skew
    lacking = [w for w, missing in enumerate(digits_skew.shard_missing) if missing]
    assert lacking  # alpha = 0.1 leaves most workers a few classes
    shard_flags = [flag for flag in digits_skew.flags if "shard" in flag]
    assert len(shard_flags) == len(lacking)
    for w, flag in zip(lacking, shard_flags, strict=True):
        assert flag.startswith(f"worker {w}'s shard has no examples of class")
        zero = [c for c, n in enumerate(digits_skew.shard_histograms[w]) if n == 0]
        assert digits_skew.shard_missing[w] == zero


def test_digits_loaded_standardised_gives_the_same_report(digits_iid):
    again = data_report_of(load_dataset("digits", seed=0), workers=4, partition="iid", seed=0)
    assert again.standardised and not digits_iid.standardised
    # The loader's standardisation is what data_report repeats: the z-scores agree exactly.
    assert again.standardised_ranges == digits_iid.standardised_ranges
    assert again.raw_ranges.mins == pytest.approx(digits_iid.raw_ranges.mins, abs=1e-6)
    assert again.raw_ranges.maxs == pytest.approx(digits_iid.raw_ranges.maxs, abs=1e-6)
    assert again.shard_histograms == digits_iid.shard_histograms
    assert again.flags == digits_iid.flags


# ------------------------------------------------------------------------------ output


def test_as_dict_is_plain_json_that_round_trips(toy_report, digits_skew):
    for report in (toy_report, digits_skew):
        d = report.as_dict()
        assert plain_json_types(d)
        assert json.loads(json.dumps(d, allow_nan=False)) == d
        assert d["duplicates"]["conflicting_rows"] == report.duplicates.conflicting_rows


def test_format_report_has_the_tables_and_ends_with_the_flags(toy_report):
    text = format_report(toy_report)
    for heading in ("Data-quality report: toy", "Classes", "Duplicates", "Features", "Shards"):
        assert heading in text
    assert "constant features: 2" in text
    tail = text.rstrip().splitlines()[-len(toy_report.flags):]
    assert tail == [f"  - {flag}" for flag in toy_report.flags]


def test_save_report_writes_json_and_text(toy_report, tmp_path):
    paths = save_report(toy_report, tmp_path / "out")
    assert [p.name for p in paths] == ["data_report.json", "data_report.txt"]
    assert json.loads(paths[0].read_text()) == toy_report.as_dict()
    assert paths[1].read_text() == format_report(toy_report)


def test_plot_shards_writes_a_png(tmp_path):
    from tinyps.report import plot_shards

    report = data_report("digits", workers=4, partition="label_skew", alpha=0.1)
    path = plot_shards(report, tmp_path / "shards.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # The tallest stack is drawn whole (autoscaling stopped at a lower layer of it).
    from tinyps.report import draw_shards

    top = draw_shards(report).axes[0].get_ylim()[1]
    assert max(report.shard_sizes) < top < 1.1 * max(report.shard_sizes)


def test_duplicates_are_counted_in_the_whole_file_before_the_split(tmp_path):
    # 200 rows of a CSV: 195 distinct ones, then 5 rows that repeat 5 of them, labels and all.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((195, 3)).round(6)
    y = rng.integers(0, 3, 195)
    rows = [(x, c) for x, c in zip(X, y, strict=True)] + [(X[i], y[i]) for i in (3, 50, 90, 120,
                                                                               194)]
    path = tmp_path / "repeats.csv"
    path.write_text("a,b,c,label\n" + "".join(f"{a},{b},{c},{label}\n"
                                              for (a, b, c), label in rows))
    report = data_report(f"csv:{path}", workers=2)
    whole, train = report.whole_duplicates, report.duplicates
    assert (whole.rows, whole.groups, whole.conflicting_groups) == (5, 5, 0)
    # Whatever the split, each repeat lands as a training repeat or a test row seen in
    # training, or both copies land in the test split (then it is neither).
    assert train.rows + train.test_in_train <= 5 and train.rows + train.test_in_train >= 1
    assert any(flag.startswith("5 rows of the data set repeat an earlier row exactly")
               for flag in report.flags)
    text = format_report(report)
    assert "rows repeating an earlier row              5" in text
