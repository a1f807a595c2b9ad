"""What the printed summary and report.png say: the features a run turned on, and staleness
measured against the bound its mode guarantees."""

import pytest

from tinyps.config import LaunchConfig
from tinyps.summary import format_summary, staleness_limit

BASE = {"staleness_bound": 0, "mode": "sync", "wait_fraction": [0.5, 0.5], "servers": 2,
        "workers": 3, "steps_per_worker": 10, "dataset": "digits", "test_accuracy": 0.9,
        "test_loss": 0.3, "final_train_loss": 0.2, "samples_per_s": 1000.0, "train_s": 1.0,
        "wall_s": 2.0, "staleness_mean": 0.0, "staleness_max": 0, "updates_applied": 10,
        "bytes_pushed": 0, "bytes_pulled": 0, "fault_events": [], "diverged": False,
        "suspect_workers": [], "precision": "fp32", "aggregate": "mean", "backup_workers": 0,
        "dropped_gradients": 0, "staleness_limit": 0}


def _text(**changes) -> str:
    return format_summary({**BASE, **changes}, "runs/x")


@pytest.mark.parametrize("mode, k, workers, limit", [
    ("sync", 0, 3, 0), ("ssp", 2, 3, 10), ("ssp", 0, 4, 3), ("ssp", 8, 2, 17),
    ("async", None, 3, None)])
def test_the_staleness_limit_is_the_modes_guarantee(mode, k, workers, limit):
    assert staleness_limit(mode, k, workers) == limit
    config = LaunchConfig.from_flat({"mode": mode, "staleness": k or 0, "workers": workers})
    assert staleness_limit(config.mode, config.staleness_bound, config.workers) == limit


def test_ssp_staleness_is_shown_against_its_bound():
    text = _text(mode="ssp", staleness_bound=2, staleness_max=7, staleness_mean=1.5,
                 staleness_limit=10)
    assert ("staleness mean 1.50, max 7 (ssp K=2 allows 10: up to 2K+1 = 5 updates by each "
            "of the 2 other workers)") in text
    assert "staleness mean 0.00, max 4 (async: no bound)" in _text(
        mode="async", staleness_bound=None, staleness_max=4, staleness_limit=None)


def test_the_features_a_run_turned_on_are_echoed():
    text = _text(precision="fp16", loss_scale="dynamic", loss_scale_final=32768.0,
                 skipped_steps=3, grad_underflow_fraction=0.0125)
    assert ("precision fp16 with fp32 master weights, loss scale dynamic (final 32768), 3 "
            "steps skipped for inf/NaN, 1.25% of gradient values underflowed to 0") in text
    assert "aggregate median" in _text(aggregate="median")
    assert "1 backup workers: 42 late gradients dropped" in _text(backup_workers=1,
                                                                 dropped_gradients=42)
    plain = _text()
    assert "precision" not in plain and "aggregate" not in plain and "dropped" not in plain


def test_the_report_draws_the_bound_and_counts_key_updates():
    from tinyps.report import draw_report

    summary = {**BASE, "mode": "ssp", "staleness_bound": 2, "staleness_limit": 10,
               "staleness_histogram": [5, 3, 2], "staleness_max": 2, "staleness_mean": 0.7,
               "per_server": [{"index": 0, "bytes_in": 1, "bytes_out": 1, "updates": 3}]}
    records = [{"worker": 0, "step": 0, "time": 1.0, "pulled": 0.5, "loss": 1.0,
                "wait_s": 0.1, "compute_s": 0.1}]
    ax = draw_report(records, summary).axes[1]
    assert ax.get_title() == "staleness: mean 0.70, max 2 (bound 10)"
    assert ax.get_ylabel().startswith("key updates")
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [10]
    assert ax.get_xlim()[1] > 10


def test_each_workers_time_splits_into_compute_wire_blocked_and_eval():
    from tinyps.summary import time_split

    records = [{"compute_s": 0.25, "wait_s": 1.0, "blocked_s": 0.5, "wire_s": 0.5},
               {"compute_s": 0.25, "wait_s": 0.25, "blocked_s": 0.0, "wire_s": 0.25,
                "test_accuracy": 0.5, "test_loss": 1.0, "eval_s": 0.25}]
    split = time_split(1, records)  # 2 s in all, in powers of two: exact shares
    assert split == {"worker": 1, "compute_s": 0.5, "wire_s": 0.75, "blocked_s": 0.5,
                     "eval_s": 0.25, "compute_share": 0.25, "wire_share": 0.375,
                     "blocked_share": 0.25, "eval_share": 0.125}
    # Lines of an older tinyps have no split: all of their wait counts as wire.
    old = time_split(0, [{"compute_s": 0.5, "wait_s": 1.5}])
    assert (old["wire_s"], old["blocked_s"], old["compute_share"]) == (1.5, 0.0, 0.25)
    assert time_split(2, [])["compute_share"] == 0.0
    text = _text(time_split=[split, old])
    assert ("time compute / wire / blocked at barriers: worker1 25% / 38% / 25% (+12% eval), "
            "worker0 25% / 75% / 0%") in text


def test_the_report_draws_the_held_out_curve_and_the_time_split():
    from tinyps.report import draw_report
    from tinyps.summary import time_split

    records = [{"worker": 0, "step": s, "time": 1.0 + s, "pulled": 0.5 + s, "loss": 1.0,
                "wait_s": 0.5, "blocked_s": 0.25, "wire_s": 0.25, "compute_s": 0.25,
                **({"test_accuracy": 0.25 * s, "test_loss": 2.0 - s, "eval_s": 0.125}
                   if s % 2 == 0 else {})} for s in range(5)]
    summary = {**BASE, "staleness_histogram": [1], "time_split": [time_split(0, records)],
               "per_server": [{"index": 0, "bytes_in": 1, "bytes_out": 1, "updates": 3}]}
    fig = draw_report(records, summary)
    held = next(ax for ax in fig.axes if ax.get_title().startswith("held-out"))
    (accuracy,) = held.get_lines()
    assert list(accuracy.get_ydata()) == [0.0, 0.5, 1.0]  # steps 0, 2, 4
    assert list(accuracy.get_xdata()) == [0.5, 2.5, 4.5]  # when their weights arrived
    split = fig.axes[2]
    assert split.get_title() == "where each worker's time went"
    assert [t.get_text() for t in split.get_legend().get_texts()] == [
        "compute", "wire (encode, transport, apply)", "blocked at barrier / bound",
        "held-out evaluation"]
    # Not evaluated during training: the plot says so rather than stay blank.
    bare = [{k: v for k, v in r.items() if k not in ("test_accuracy", "test_loss", "eval_s")}
            for r in records]
    held = next(ax for ax in draw_report(bare, summary).axes
                if ax.get_title().startswith("held-out"))
    assert "not evaluated" in held.texts[0].get_text()
