"""Held-out evaluation during training: which steps, what a metrics line carries, and that
its time is neither compute nor waiting; for a worker and for the single-process baseline."""

import json
from dataclasses import replace

import numpy as np
import pytest

from ps.client import PSClient
from ps.server import serve
from tinyps.baseline import run_baseline
from worker.baseline import train_single_process
from worker.data import load_dataset
from worker.evaluate import HeldOut, eval_interval
from worker.loop import WorkerConfig, run_worker
from worker.model import MLP
from worker.settings import TrainConfig
from worker.shards import partition

HELD_OUT_KEYS = {"test_accuracy", "test_loss", "eval_s"}


def test_due_steps_are_every_nth_from_the_first_and_the_last():
    X, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int64)
    assert [s for s in range(12) if HeldOut(X, y, 5).due(s, 12)] == [0, 5, 10, 11]
    assert [s for s in range(4) if HeldOut(X, y, 1).due(s, 4)] == [0, 1, 2, 3]
    assert not any(HeldOut(X, y, 0).due(s, 12) for s in range(12))  # 0: off


def test_the_default_interval_is_one_epoch():
    assert eval_interval(None, 22) == 22
    assert eval_interval(None, 0) == 1  # a shard smaller than a batch: every step
    assert eval_interval(7, 22) == 7 and eval_interval(0, 22) == 0


@pytest.mark.parametrize("bad", [-1, -20])
def test_a_negative_eval_every_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=f"eval_every must be >= 0 .*got {bad}"):
        TrainConfig(eval_every=bad)
    with pytest.raises(ValueError, match="eval_every"):
        eval_interval(bad, 10)
    with pytest.raises(ValueError, match="held-out set needs as many labels as rows"):
        HeldOut(np.zeros((2, 2), np.float32), np.zeros(3, np.int64), 1)


@pytest.mark.parametrize("fused", [True, False], ids=["push_pull", "two_calls"])
def test_a_worker_records_held_out_figures_at_the_weights_it_pulled(fused):
    data = load_dataset("digits", seed=0)
    model = MLP((data.n_features, 16, data.n_classes), seed=0)
    shard = partition(data, 1, "iid", seed=0)[0]
    running = serve(mode="sync", workers=1)
    try:
        with PSClient([running.address]) as client:
            client.init(model.init_params(), "sgd", lr=0.1)
            records = run_worker(client, model, shard,
                                 WorkerConfig(steps=10, batch_size=32, fused=fused),
                                 held_out=HeldOut(data.X_test, data.y_test, 4))
    finally:
        running.stop(0)
    lines = [json.loads(json.dumps(r.as_dict())) for r in records]
    assert [r["step"] for r in lines if "test_accuracy" in r] == [0, 4, 8, 9]
    assert all(set(r).isdisjoint(HELD_OUT_KEYS) for r in lines if r["step"] not in (0, 4, 8, 9))
    # Step 0 evaluates the weights it pulled: the initial ones, exactly.
    loss, accuracy = model.evaluate(model.init_params(), data.X_test, data.y_test)
    assert (lines[0]["test_accuracy"], lines[0]["test_loss"]) == (accuracy, loss)
    assert lines[-1]["test_accuracy"] > lines[0]["test_accuracy"]  # it learned meanwhile
    for r in lines:
        assert r["wait_s"] == pytest.approx(r["blocked_s"] + r["wire_s"])
        # The step's span (weights in hand -> push answered) holds the evaluation, compute
        # and push apart: were eval counted in compute, it would be counted twice here.
        assert r["time"] - r["pulled"] >= r.get("eval_s", 0.0) + r["compute_s"] + r["push_s"]


def test_the_baseline_records_the_curve_in_its_result_and_metrics(tmp_path):
    config = TrainConfig(dataset="digits", hidden=(16,), steps=25, eval_every=10, seed=0)
    result, run_dir = run_baseline(config, run_dir=tmp_path / "train")
    assert [p["step"] for p in result.test_curve] == [0, 10, 20, 24]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "test_accuracy" in r] == [0, 10, 20, 24]
    by_step = {r["step"]: r for r in lines}
    for point in result.test_curve:
        assert by_step[point["step"]]["test_accuracy"] == point["test_accuracy"]
    assert result.eval_s == pytest.approx(sum(p["eval_s"] for p in result.test_curve))
    # Each point's training time leaves the evaluations out: it grows, and stays within the
    # run's, which is its wall time less them.
    times = [p["train_s"] for p in result.test_curve]
    assert times[0] < 0.5 * times[-1] and times == sorted(times)
    assert times[-1] <= result.train_s == pytest.approx(result.wall_s - result.eval_s)
    # Off: no curve.
    assert train_single_process(replace(config, eval_every=0)).test_curve == []
