"""The convergence suite the course is built on: sync, async and ssp on digits from the same
seeds, time to a target loss with and without a straggler, and label-skewed shards.

Each run is a real cluster (server and worker processes) started by tinyps.launch; runs are
shared between tests through a module-level cache, and their loss curves stay in their run
directories for a student to plot.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import tinyps
from worker.data import load_dataset
from worker.shards import class_histograms, partition

TARGET = 0.3  # training loss (mean of 20 consecutive steps) that counts as "reached"
WINDOW = 20
SLOW = 30.0  # the straggler computes 30x slower: seconds of difference, far above noise
COMMON = {"workers": 2, "servers": 2, "epochs": 10, "seed": 0, "dataset": "digits"}
RUNS = {
    "sync": {"mode": "sync"},
    "async": {"mode": "async"},
    "ssp": {"mode": "ssp", "staleness": 3},
    "sync_slow": {"mode": "sync", "slow_worker": (1, SLOW)},
    "async_slow": {"mode": "async", "slow_worker": (1, SLOW)},
    "ssp_slow": {"mode": "ssp", "staleness": 3, "slow_worker": (1, SLOW)},
    **{f"iid4_seed{seed}": {"mode": "async", "workers": 4, "servers": 1, "seed": seed}
       for seed in (0, 1)},
    **{f"skew4_seed{seed}": {"mode": "async", "workers": 4, "servers": 1, "seed": seed,
                             "partition": "label_skew", "alpha": 0.05} for seed in (0, 1)},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    done: dict[str, tuple[dict, Path]] = {}

    def get(name: str) -> tuple[dict, list[dict], Path]:
        if name not in done:
            settings = {**COMMON, **RUNS[name]}
            done[name] = tinyps.launch(run_dir=str(tmp_path_factory.mktemp(name)), **settings)
        summary, run_dir = done[name]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        return summary, records, run_dir

    return get


def _reached(records: list[dict]) -> tuple[float, int, int]:
    """When the run first reached TARGET: (seconds since every worker was running,
    updates applied by then, records by then). Records in time order; sync applies one
    update per step, async and ssp one per record."""
    records = sorted(records, key=lambda r: r["time"])
    started = max(min(r["pulled"] for r in records if r["worker"] == w)
                  for w in {r["worker"] for r in records})
    losses = np.array([r["loss"] for r in records])
    for i in range(WINDOW, len(records) + 1):
        if losses[i - WINDOW:i].mean() < TARGET:
            steps = max(r["step"] for r in records[:i]) + 1
            return records[i - 1]["time"] - started, steps, i
    raise AssertionError(f"never reached a training loss of {TARGET}")


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_each_mode_learns_digits(run, mode):
    summary, records, _ = run(mode)
    assert summary["test_accuracy"] >= 0.93
    assert summary["final_train_loss"] < 0.2
    assert len(records) == 2 * summary["steps_per_worker"]


def test_only_sync_applies_fresh_gradients(run):
    assert run("sync")[0]["staleness_max"] == 0
    assert run("async")[0]["staleness_mean"] > 0
    ssp = run("ssp")[0]
    assert ssp["staleness_mean"] > 0 and ssp["staleness_max"] <= (2 - 1) * (2 * 3 + 1)


def test_with_a_straggler_async_and_ssp_reach_the_target_sooner_than_sync(run):
    sync_s = _reached(run("sync_slow")[1])[0]
    async_s = _reached(run("async_slow")[1])[0]
    ssp_s = _reached(run("ssp_slow")[1])[0]
    # sync waits for the straggler at every step; ssp lets the fast worker run K steps
    # ahead; async never waits.
    assert async_s < sync_s and ssp_s < sync_s, (sync_s, ssp_s, async_s)
    waited = run("sync_slow")[0]["wait_fraction"][0]
    assert waited > 0.8  # the fast worker of sync spent its time waiting for the slow one


def test_without_a_straggler_sync_needs_no_more_updates_than_async(run):
    _, sync_updates, _ = _reached(run("sync")[1])
    _, _, async_updates = _reached(run("async")[1])  # each async record is one update
    # A sync update averages W gradients (a batch of W*b); an async update uses one.
    assert sync_updates <= async_updates, (sync_updates, async_updates)


def test_label_skew_separates_the_workers_loss_curves(run):
    data = load_dataset("digits", seed=0)

    def entropy(shards):  # mean per-worker class entropy, bits: log2(10) = 3.32 is uniform
        hist = class_histograms(shards, 10)
        p = hist / hist.sum(axis=1, keepdims=True)
        return float(np.mean(-(p * np.log2(np.where(p > 0, p, 1))).sum(axis=1)))

    for seed in (0, 1):  # the shards are deterministic by seed
        assert entropy(partition(data, 4, "iid", seed=seed)) > 3.2
        assert entropy(partition(data, 4, "label_skew", alpha=0.05, seed=seed)) < 2.0

    def curve_spread(records):
        """How far apart the workers' loss curves sit while they learn: the spread of each
        worker's median loss over the same stretch of time, from when a fifth of all steps
        were done to when half were. Time, not step number: in async one worker may run
        ahead of another, and its step k then meets a less trained model. Quantiles of the
        record times, not fractions of the span: one stalled process on a busy machine
        cannot empty the window. Medians: robust to odd batches."""
        times = sorted(r["time"] for r in records)
        lo, hi = times[len(times) // 5], times[len(times) // 2]
        by_worker = {}
        for r in records:
            if lo <= r["time"] <= hi:
                by_worker.setdefault(r["worker"], []).append(r["loss"])
        return float(np.std([np.median(losses) for losses in by_worker.values()]))

    # Each skewed worker sees a different task (a few classes, easier or harder than the
    # average), so its loss curve sits apart from the others'; iid workers' curves coincide.
    # Two seeds each, summed: async interleaving adds noise to any one run.
    iid = sum(curve_spread(run(f"iid4_seed{seed}")[1]) for seed in (0, 1))
    skew = sum(curve_spread(run(f"skew4_seed{seed}")[1]) for seed in (0, 1))
    assert skew > iid, (skew, iid)
    # The shared model still learns (skew costs a few points of accuracy here).
    for seed in (0, 1):
        assert run(f"skew4_seed{seed}")[0]["test_accuracy"] >= 0.7
        assert run(f"iid4_seed{seed}")[0]["test_accuracy"] >= 0.93
