"""DP-SGD end to end on digits: the trade-off between noise, accuracy and epsilon; noise on
the workers or once on the servers; sigma chosen for a target epsilon; budgets refused.

Each run is a real cluster (1 server, 2 workers, sync) with seeded noise, so that it repeats.
"""

from pathlib import Path

import pytest

import tinyps
from worker.accountant import dp_sgd_epsilon

BASE = {"servers": 1, "workers": 2, "mode": "sync", "seed": 0, "epochs": 10, "lr": 0.5,
        "dp_clip": 1.0, "dp_seed": 0}
RUNS = {
    "sigma_0.5": {**BASE, "dp_noise": 0.5},
    "sigma_1": {**BASE, "dp_noise": 1.0},
    "sigma_2": {**BASE, "dp_noise": 2.0},
    "sigma_8": {**BASE, "dp_noise": 8.0},
    "server_noise": {**BASE, "dp_noise": 1.0, "dp_noise_at": "server"},
    "target_2": {**BASE, "dp_target_epsilon": 2.0},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    done: dict[str, tuple[dict, Path]] = {}

    def get(name: str) -> tuple[dict, Path]:
        if name not in done:
            folder = tmp_path_factory.mktemp(name.replace(".", "_"))
            done[name] = tinyps.launch(run_dir=str(folder), **RUNS[name])
        return done[name]

    return get


def test_more_noise_costs_accuracy_and_buys_a_smaller_epsilon(run):
    summaries = [run(name)[0] for name in ("sigma_0.5", "sigma_2", "sigma_8")]
    accuracies = [s["test_accuracy"] for s in summaries]
    epsilons = [s["dp_epsilon"] for s in summaries]
    assert accuracies[0] > accuracies[1] > accuracies[2], accuracies
    assert epsilons[0] > epsilons[1] > epsilons[2], epsilons


def test_sigma_1_still_learns_digits(run):
    summary, _ = run("sigma_1")
    assert summary["test_accuracy"] >= 0.85
    assert summary["dp_noise"] == 1.0 and summary["dp_clip"] == 1.0
    assert summary["dp_delta"] == 1e-5 and summary["dp_sampling"] == "poisson"


def test_the_summary_reports_the_accountants_epsilon_for_the_steps_made(run):
    summary, _ = run("sigma_1")
    q = summary["sample_rate"]
    assert q == pytest.approx(32 / 719)  # batch 32 of a shard of 1438 / 2 examples
    steps = summary["steps_per_worker"]
    assert summary["dp_epsilon"] == pytest.approx(dp_sgd_epsilon(q, 1.0, steps, 1e-5))
    by_epoch = summary["dp_epsilon_by_epoch"]
    assert len(by_epoch) == int(steps * q)  # one figure per whole epoch of the shard
    assert all(a < b for a, b in zip(by_epoch, by_epoch[1:], strict=False))
    assert by_epoch[-1] <= summary["dp_epsilon"]


def test_noise_on_the_servers_spends_the_same_epsilon_with_less_noise_in_the_aggregate(run):
    worker_side, _ = run("sigma_1")
    server_side, _ = run("server_noise")
    assert server_side["dp_epsilon"] == worker_side["dp_epsilon"]
    assert server_side["dp_noise_at"] == "server"
    # One draw of noise on the sum instead of one per worker: at W=2, half the variance.
    assert server_side["test_accuracy"] >= 0.85


def test_a_target_epsilon_chooses_sigma_and_the_run_stays_within_it(run):
    summary, run_dir = run("target_2")
    assert summary["dp_epsilon"] <= 2.0
    assert summary["dp_epsilon"] >= 2.0 * 0.95  # the smallest sigma that fits: close to it
    assert summary["dp_noise"] > 1.0
    saved = (run_dir / "config.json").read_text()
    assert f'"dp_noise": {summary["dp_noise"]}' in saved  # the sigma chosen is recorded


def test_a_budget_the_plan_would_exceed_is_refused_before_anything_starts(tmp_path):
    run_dir = tmp_path / "over"
    with pytest.raises(ValueError, match=r"would spend epsilon 4\.97\d, over the budget of 1"):
        tinyps.launch(run_dir=str(run_dir), **{**BASE, "dp_noise": 1.0,
                                                "dp_target_epsilon": 1.0})
    assert not list(run_dir.glob("logs/*.log"))
    with pytest.raises(ValueError, match="dp_target_epsilon 1e-06"):
        tinyps.launch(run_dir=str(tmp_path / "impossible"),
                      **{**BASE, "dp_target_epsilon": 1e-6})


@pytest.mark.parametrize("settings, message", [
    ({"dp_noise": 1.0, "precision": "fp16"}, "DP-SGD runs in fp32"),
    ({"dp_noise": 1.0, "dp_noise_at": "server", "mode": "async"}, "needs --mode sync"),
    ({"dp_noise": 1.0, "dp_clip": 0.0}, "dp clip"),
    ({"dp_seed": 3}, "need --dp-noise or --dp-target-epsilon"),
])
def test_bad_dp_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        tinyps.LaunchConfig.from_flat(settings)


def test_a_resumed_dp_run_counts_the_steps_before_it_and_keeps_its_settings(run, tmp_path):
    first, first_dir = run("sigma_1")
    steps = first["steps_per_worker"]
    with pytest.raises(ValueError, match="must keep the resumed run's settings.*dp_noise"):
        tinyps.launch(run_dir=str(tmp_path / "louder"),
                      **{**RUNS["sigma_1"], "dp_noise": 2.0, "steps": steps + 20,
                         "resume": str(first_dir)})
    assert not (tmp_path / "louder").exists()
    more, _ = tinyps.launch(run_dir=str(tmp_path / "more"),
                            **{**RUNS["sigma_1"], "steps": steps + 20,
                               "resume": str(first_dir)})
    # Epsilon of all steps: the resumed run's and these 20, one mechanism throughout.
    assert more["dp_epsilon"] == pytest.approx(
        dp_sgd_epsilon(first["sample_rate"], 1.0, steps + 20, 1e-5))
    assert more["dp_epsilon"] > first["dp_epsilon"]
