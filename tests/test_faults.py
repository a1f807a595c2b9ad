"""Faults and recovery end to end: a killed server restarted from its checkpoint, a killed
worker restarted (or given up on), a run resumed on another number of servers, Byzantine
workers against robust aggregation, backup workers, and the settings refused up front.

Each run is a real cluster started by tinyps.launch on digits; runs are shared between tests
through a module-level cache, and stay in their run directories for a student to look at.
"""

import json
from itertools import pairwise
from pathlib import Path

import pytest

import tinyps
from tinyps import LaunchConfig

STEPS = 160  # per worker; sync, so one update of the model per step
COMMON = {"servers": 2, "workers": 2, "mode": "sync", "seed": 0, "checkpoint_every": 10}
W_STEPS = 300  # per worker in the worker-kill runs, of 3 workers
W_KILL = 3 * W_STEPS // 4  # worker 1 is killed after a quarter of the 3 * W_STEPS records
# A restarted worker needs about 1.5 s to start (imports, kernels, data). A straggler paces
# the barrier (tens of ms a step instead of about one) so that the others, who no longer wait
# for the dead worker, still have seconds of steps left when it rejoins. The runs that kill a
# process take it too: the launcher looks every 0.05 s, and without it the rest of a run can
# end before the kill lands.
PACE = (0, 50.0)
BYZANTINE = {"servers": 1, "workers": 5, "mode": "sync", "seed": 0, "steps": 200,
             "byzantine": 1}
BACKUP = {"servers": 1, "workers": 3, "mode": "sync", "seed": 0, "steps": 100,
          "slow_worker": (2, 5.0)}
RUNS = {
    "sync": {**COMMON, "steps": STEPS},
    "server_killed": {**COMMON, "steps": STEPS, "kill_server": (1, STEPS),  # mid-run
                      "slow_worker": PACE},
    "first_half": {**COMMON, "steps": STEPS // 2},
    "resumed": {**COMMON, "servers": 3, "steps": STEPS, "resume": "first_half"},
    "worker_restarted": {**COMMON, "workers": 3, "steps": W_STEPS, "kill_worker": (1, W_KILL),
                         "slow_worker": PACE},
    "worker_lost": {**COMMON, "workers": 3, "steps": W_STEPS, "kill_worker": (1, W_KILL),
                    "max_restarts": 0, "slow_worker": PACE},
    "mean": {**BYZANTINE, "aggregate": "mean"},
    "median": {**BYZANTINE, "aggregate": "median"},
    "trimmed_mean:0.2": {**BYZANTINE, "aggregate": "trimmed_mean:0.2"},
    "backup": {**BACKUP, "backup_workers": 1},
    "no_backup": {**BACKUP, "backup_workers": 0},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(name) -> (summary, run directory); "resume" names another run of RUNS."""
    done: dict[str, tuple[dict, Path]] = {}

    def get(name: str) -> tuple[dict, Path]:
        if name not in done:
            settings = dict(RUNS[name])
            if "resume" in settings:
                settings["resume"] = str(get(settings["resume"])[1])
            folder = tmp_path_factory.mktemp(name.replace(":", "_"))
            done[name] = tinyps.launch(run_dir=str(folder), **settings)
        return done[name]

    return get


def _steps(run_dir: Path, worker: int) -> list[int]:
    """The steps of a worker's records, in the order it wrote them (a restart appends)."""
    path = run_dir / "metrics" / f"worker{worker}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _servers_holding(placement: dict) -> set[int]:
    """The servers a placement (as summary.json shows it) puts any tensor or row range on."""
    return {part["server"] for where in placement.values()
            for part in (where if isinstance(where, list) else [{"server": where}])}


# -- a killed server ---------------------------------------------------------------------

def test_a_killed_server_is_restarted_from_its_checkpoint(run):
    summary, run_dir = run("server_killed")
    assert summary["restarts"] >= 1
    assert any("server1" in event for event in summary["fault_events"])
    assert summary["checkpoints_written"] > 0
    assert summary["updates_applied"] == STEPS
    assert summary["workers_lost"] == [] and not summary["diverged"]
    assert all(_steps(run_dir, w) == list(range(STEPS)) for w in range(2))
    # At most checkpoint_every updates of server1's keys are lost: the model barely notices.
    undisturbed = run("sync")[0]["test_accuracy"]
    assert abs(summary["test_accuracy"] - undisturbed) <= 0.02, (
        summary["test_accuracy"], undisturbed)


# -- a killed worker ---------------------------------------------------------------------

def test_a_killed_worker_is_restarted_and_goes_on_where_the_others_are(run):
    summary, run_dir = run("worker_restarted")
    assert summary["restarts"] == 1 and summary["workers_lost"] == []
    assert any("worker1" in event for event in summary["fault_events"])
    assert summary["updates_applied"] == W_STEPS
    steps = _steps(run_dir, 1)
    # Killed part way: the steps made while it was dead are missing. Restarted: it made steps
    # after that, up to the last one, and never one twice.
    assert len(steps) < W_STEPS
    assert steps[-1] == W_STEPS - 1
    assert all(a < b for a, b in pairwise(steps))
    gaps = [(a, b) for a, b in pairwise(steps) if b != a + 1]
    assert len(gaps) == 1, gaps  # the one stretch it was dead for
    for w in (0, 2):
        assert _steps(run_dir, w) == list(range(W_STEPS))
    assert summary["test_accuracy"] >= 0.9


def test_with_no_restarts_left_the_run_goes_on_without_the_killed_worker(run):
    summary, run_dir = run("worker_lost")
    assert summary["restarts"] == 0 and summary["workers_lost"] == [1]
    assert summary["updates_applied"] == W_STEPS
    lost = _steps(run_dir, 1)
    assert lost == list(range(len(lost))) and len(lost) < W_STEPS
    for w in (0, 2):
        assert _steps(run_dir, w) == list(range(W_STEPS))
    assert summary["test_accuracy"] >= 0.9


def test_a_run_that_lost_a_worker_says_so_in_its_exit_code(run):
    result = run("worker_lost")
    assert result.exit_code == 3 and not result.ok
    assert result.outcome.startswith("lost worker1 for good")
    assert run("worker_restarted").exit_code == 0  # restarted: trained as asked
    assert run("worker_restarted").outcome == "trained as asked"


# -- resume ------------------------------------------------------------------------------

def test_a_run_resumes_on_another_number_of_servers(run):
    summary, run_dir = run("resumed")
    assert summary["servers"] == 3 and len(summary["per_server"]) == 3
    for w in range(2):
        assert _steps(run_dir, w) == list(range(STEPS // 2, STEPS))
    assert summary["updates_applied"] == STEPS
    uninterrupted = run("sync")[0]["test_accuracy"]
    assert abs(summary["test_accuracy"] - uninterrupted) <= 0.01, (
        summary["test_accuracy"], uninterrupted)


def test_a_resumed_run_counts_the_steps_of_this_launch_and_says_what_it_resumed(run):
    source = run("first_half")[1]
    summary, _ = run("resumed")
    assert summary["resumed_from"] == {"run": str(source), "step": STEPS // 2}
    assert summary["steps_per_worker"] == STEPS
    assert summary["steps_this_launch"] == STEPS - STEPS // 2
    assert summary["steps_done"] == 2 * (STEPS - STEPS // 2)
    assert summary["interrupted"] is False
    assert run("first_half")[0]["resumed_from"] is None
    assert run("first_half")[0]["steps_this_launch"] == STEPS // 2


@pytest.mark.parametrize(("asked", "flag"), [({"steps": STEPS // 2}, "--steps 80"),
                                             ({"steps": 10}, "--steps 10"),
                                             ({"steps": None, "epochs": 1}, "--epochs 1")])
def test_a_resume_with_nothing_left_to_train_is_refused_before_anything(run, tmp_path, asked,
                                                                        flag):
    source = run("first_half")[1]  # holds 80 steps per worker
    run_dir = tmp_path / "nothing"
    with pytest.raises(ValueError) as err:
        tinyps.launch(run_dir=str(run_dir), **{**COMMON, **asked, "resume": str(source)})
    message = str(err.value)
    assert f"holds {STEPS // 2} steps per worker already" in message, message
    assert "nothing left to train" in message and flag in message, message
    assert "Raise --epochs or --steps" in message
    assert not run_dir.exists()  # refused before the run directory was made


def test_a_resume_with_another_number_of_workers_is_refused_before_any_process(run, tmp_path):
    source = run("first_half")[1]
    run_dir = tmp_path / "resumed"
    settings = {**COMMON, "workers": 3, "steps": STEPS, "resume": str(source)}
    with pytest.raises(ValueError, match=r"2 workers.*3 workers"):
        tinyps.launch(run_dir=str(run_dir), **settings)
    assert not run_dir.exists()  # refused before the run directory was made


@pytest.mark.parametrize("where", ["checkpoint_dir", "checkpoints_in_run_dir"])
def test_a_resume_that_would_overwrite_its_source_is_refused(run, tmp_path, where):
    source = run("first_half")[1]
    before = sorted(p.name for p in (source / "checkpoints").glob("server*/*"))
    settings = {**COMMON, "steps": STEPS}
    if where == "checkpoint_dir":  # the new run would clear the old run's checkpoints
        settings.update(resume=str(source), run_dir=str(tmp_path / "new"),
                        checkpoint_dir=str(source / "checkpoints"))
    else:  # resuming from <run>/checkpoints into <run>
        settings.update(resume=str(source / "checkpoints"), run_dir=str(source))
    with pytest.raises(ValueError, match="would be overwritten by this run"):
        tinyps.launch(**settings)
    assert sorted(p.name for p in (source / "checkpoints").glob("server*/*")) == before


def test_a_resume_into_its_own_run_directory_is_refused(run):
    source = run("first_half")[1]
    before = (source / "summary.json").read_text()
    with pytest.raises(ValueError, match="would be overwritten by this run"):
        tinyps.launch(run_dir=str(source), **{**COMMON, "steps": STEPS, "resume": str(source)})
    assert (source / "summary.json").read_text() == before  # the old run is untouched
    assert list((source / "checkpoints").glob("server*/*"))


# -- the final model ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sync", "resumed"])  # 2 and 3 servers
def test_the_saved_model_is_the_one_the_summary_evaluated(run, digits, name):
    summary, run_dir = run(name)
    model, params, placement = tinyps.load_model(run_dir)
    _, accuracy = model.evaluate(params, digits.X_test, digits.y_test)
    assert accuracy == summary["test_accuracy"]
    assert placement == summary["placement"]
    assert _servers_holding(placement) == set(range(summary["servers"]))


# -- Byzantine workers -------------------------------------------------------------------

def test_one_byzantine_worker_ruins_the_mean(run):
    summary, _ = run("mean")
    # Its gradient, -10 times the true one, outweighs the four honest ones in a mean.
    assert summary["diverged"]
    assert summary["test_accuracy"] < 0.5
    assert summary["updates_applied"] == BYZANTINE["steps"]
    assert run("mean").exit_code == 4
    assert run("mean").outcome.startswith("the model diverged: ")
    assert summary["diverged_reason"] in run("mean").outcome


@pytest.mark.parametrize("rule", ["median", "trimmed_mean:0.2"])
def test_robust_aggregation_ignores_one_byzantine_worker(run, rule):
    summary, _ = run(rule)
    assert summary["aggregate"] == rule and summary["byzantine_workers"] == 1
    assert not summary["diverged"] and summary["diverged_reason"] is None
    assert run(rule).exit_code == 0
    assert summary["test_accuracy"] >= 0.90
    assert summary["test_accuracy"] > run("mean")[0]["test_accuracy"] + 0.5


# -- backup workers ----------------------------------------------------------------------

def test_backup_workers_drop_the_stragglers_gradients(run):
    summary, _ = run("backup")
    assert summary["dropped_gradients"] > 0
    assert summary["test_accuracy"] >= 0.9
    assert summary["updates_applied"] == BACKUP["steps"]


def test_without_backup_workers_no_gradient_is_dropped(run):
    summary, _ = run("no_backup")
    assert summary["dropped_gradients"] == 0
    assert summary["test_accuracy"] >= 0.9


# -- settings refused up front -----------------------------------------------------------

@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 2, "backup_workers": 2}, r"backup_workers must be in 0\.\.1"),
        ({"mode": "async", "backup_workers": 1}, r"backup_workers \(1\) is for --mode sync"),
        ({"mode": "async", "aggregate": "median"}, "--aggregate median is for --mode sync"),
        ({"aggregate": "trimmed_mean:0.7"}, r"trimmed_mean:0\.7.*must be in \[0, 0\.5\), got 0\.7"),
        ({"workers": 2, "byzantine": 3}, r"byzantine must be in 0\.\.2"),
        ({"servers": 2, "kill_server": (5, 10)}, r"kill_server: 5 is not one of 0\.\.1"),
    ],
)
def test_bad_fault_settings_are_refused_before_any_process_starts(tmp_path, settings,
                                                                   message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig.from_flat(settings)
    run_dir = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        tinyps.launch(run_dir=str(run_dir), **settings)
    assert not run_dir.exists()
