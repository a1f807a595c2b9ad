"""Poisoning and its detection: the injected poisons on their own, the servers' gradient
watch on made-up gradients, and on digits a label-flipping worker that the servers flag and
that robust aggregation shrugs off, against a clean run of the same seeds."""

import math
from pathlib import Path

import numpy as np
import pytest

import tinyps
from ps.watch import GradientWatch
from worker.poison import BYZANTINE, parse_poison, poison_grads, poison_shard
from worker.shards import Shard

# -- the poisons ---------------------------------------------------------------------------


def _shard():
    return Shard(np.zeros((6, 2), np.float32), np.array([0, 1, 2, 3, 4, 9]), np.arange(6))


def test_label_flip_maps_class_c_to_c_minus_1_minus_c():
    flipped = poison_shard(_shard(), "label_flip", n_classes=10, seed=0)
    np.testing.assert_array_equal(flipped.y, [9, 8, 7, 6, 5, 0])


def test_random_labels_are_seeded_and_in_range():
    a = poison_shard(_shard(), "random_labels", n_classes=10, seed=3)
    b = poison_shard(_shard(), "random_labels", n_classes=10, seed=3)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.y.min() >= 0 and a.y.max() < 10


def test_scaled_gradient_and_the_byzantine_worker_are_one_mechanism():
    grads = {"w": np.ones(3, np.float32)}
    np.testing.assert_array_equal(poison_grads(grads, BYZANTINE)["w"], -10.0)
    np.testing.assert_array_equal(poison_grads(grads, "scaled_gradient:0.5")["w"], 0.5)
    assert poison_grads(grads, "label_flip") is grads  # a data poison leaves gradients alone
    assert tinyps.LaunchConfig.from_flat({"workers": 3, "byzantine": 2}).faults.poison_workers == 2
    with pytest.raises(ValueError, match="give one or the other"):
        tinyps.LaunchConfig.from_flat({"workers": 3, "byzantine": 1, "poison": "label_flip"})


@pytest.mark.parametrize("text, message", [
    ("flip", "poison must be one of"),
    ("label_flip:2", "takes no argument"),
    ("scaled_gradient", "needs a factor"),
    ("scaled_gradient:inf", "must be finite"),
])
def test_bad_poisons_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_poison(text)


# -- the watch -----------------------------------------------------------------------------


def _observe(watch, rng, bad=None, steps=30):
    direction = rng.standard_normal(500)
    for _ in range(steps):
        grads = {w: (direction + 0.8 * rng.standard_normal(500)).astype(np.float32)
                 for w in range(5)}
        if bad is not None:
            grads[3] = bad(grads[3])
        watch.observe(grads)


def test_the_watch_measures_leave_one_out_cosines_and_norm_ratios():
    # The definition, in float64 and by hand: each worker against the sum of the others.
    rng = np.random.default_rng(5)
    steps = [{w: (rng.standard_normal(300) * (w + 1)).astype(np.float32) for w in (4, 7, 9)}
             for _ in range(3)] + [{4: np.full(300, 1e20, np.float32),  # overflows float32
                                    7: np.full(300, -3e20, np.float32),
                                    9: np.full(300, 2e20, np.float32)}]
    watch = GradientWatch()
    want = {w: [0.0, 0.0] for w in (4, 7, 9)}
    for grads in steps:
        watch.observe(grads)
        x = {w: g.astype(np.float64) for w, g in grads.items()}
        median = np.median([np.linalg.norm(v) for v in x.values()])
        for w, v in x.items():
            others = sum(x[o] for o in x if o != w)
            want[w][0] += v @ others / (np.linalg.norm(v) * np.linalg.norm(others)) / len(steps)
            want[w][1] += math.log(np.linalg.norm(v) / median) / len(steps)
    for w, (cosine, ratio) in watch.summary().items():
        assert cosine == pytest.approx(want[w][0], abs=1e-5)
        assert math.log(ratio) == pytest.approx(want[w][1], abs=1e-5)


def test_honest_workers_are_not_flagged():
    watch = GradientWatch()
    _observe(watch, np.random.default_rng(0))
    assert watch.suspects() == []
    cosines = [c for c, _ in watch.summary().values()]
    assert min(cosines) > 0.5


@pytest.mark.parametrize("bad", [lambda g: -g, lambda g: 8 * g, lambda g: 0.1 * g],
                         ids=["reversed", "scaled up", "scaled down"])
def test_a_worker_whose_gradients_stand_apart_is_flagged(bad):
    watch = GradientWatch()
    _observe(watch, np.random.default_rng(1), bad)
    assert watch.suspects() == [3]


def test_nobody_is_flagged_on_too_little_evidence_or_too_few_workers():
    watch = GradientWatch()
    _observe(watch, np.random.default_rng(2), lambda g: -g, steps=5)
    assert watch.suspects() == []  # five steps: not enough to accuse anyone
    pair = GradientWatch()
    for _ in range(50):
        pair.observe({0: np.ones(4, np.float32), 1: -np.ones(4, np.float32)})
    assert pair.suspects() == []  # of two who disagree, neither is "the others"


def test_the_servers_flag_a_suspect_over_grpc_and_status_shows_it():
    from ps.client import PSClient
    from ps.server import serve
    from tinyps.status import status_table

    running = serve(mode="sync", workers=4)
    rng = np.random.default_rng(4)
    try:
        clients = [PSClient([running.address], worker_id=w) for w in range(4)]
        clients[0].init({"w": np.zeros(300, np.float32)}, "sgd", lr=1e-3)
        direction = rng.standard_normal(300)
        for step in range(25):
            for w, client in enumerate(clients):
                g = direction + 0.5 * rng.standard_normal(300)
                client.push({"w": (-g if w == 2 else g).astype(np.float32)}, step)
        stats = clients[0].stats()
        assert stats[0]["suspect_workers"] == [2]
        assert "suspect workers (gradients unlike the others'): 2" in status_table(stats)
        for client in clients:
            client.close()
    finally:
        running.stop(0)


def test_data_report_from_the_command_line(tmp_path, capsys):
    from tinyps.cli import main

    assert main(["data-report", "digits", "--workers", "4", "--partition", "label_skew",
                 "--alpha", "0.1", "--out", str(tmp_path), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "worker 0's shard has no examples of classes" in out
    assert "constant features" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["data_report.json", "data_report.png", "data_report.txt"]


# -- on digits -----------------------------------------------------------------------------

BASE = {"servers": 1, "workers": 4, "mode": "sync", "seed": 0, "epochs": 10}
FLIP = {**BASE, "poison_workers": 1, "poison": "label_flip"}
RUNS = {
    "clean": BASE,
    "flip_mean": FLIP,
    "flip_median": {**FLIP, "aggregate": "median"},
    # With four workers, trimming a quarter from each end keeps the middle two: the median
    # of four. Still its own rule, checked on its own.
    "flip_trimmed": {**FLIP, "aggregate": "trimmed_mean:0.25"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    done: dict[str, tuple[dict, Path]] = {}

    def get(name: str) -> tuple[dict, Path]:
        if name not in done:
            done[name] = tinyps.launch(run_dir=str(tmp_path_factory.mktemp(name)), **RUNS[name])
        return done[name]

    return get


def test_the_label_flipping_worker_is_flagged_and_no_honest_one_is(run):
    assert run("flip_mean")[0]["suspect_workers"] == [0]
    clean = run("clean")[0]
    assert clean["suspect_workers"] == []
    # What the servers saw: the flipped worker's gradients point away from the others'.
    cosine = run("flip_mean")[0]["grad_cosine"]
    assert cosine[0] < 0 and cosine[0] < min(cosine[w] for w in (1, 2, 3)) - 0.2


def test_the_mean_suffers_from_the_flipped_labels(run):
    clean = run("clean")[0]["test_accuracy"]
    poisoned = run("flip_mean")[0]["test_accuracy"]
    assert poisoned < clean - 0.03  # measurably below the clean run of the same seeds


@pytest.mark.parametrize("name", ["flip_median", "flip_trimmed"])
def test_robust_aggregation_keeps_the_accuracy(run, name):
    summary = run(name)[0]
    assert summary["test_accuracy"] >= 0.90
    assert summary["test_accuracy"] > run("flip_mean")[0]["test_accuracy"]
