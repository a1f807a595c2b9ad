"""A run settled before it starts (tinyps/plan.py): what it refuses and what it warns of."""

import os

import pytest

from tinyps.config import LaunchConfig
from tinyps.plan import check_every_server_holds_something, launch_warnings, model_placement
from worker.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("servers, hidden, split", [(5, (128,), None), (100, (128,), None),
                                                   (7, (64, 32), None), (6, (128,), 1_000_000)])
def test_more_servers_than_parts_is_refused_naming_how_many_fit(digits, servers, hidden, split):
    config = LaunchConfig.from_flat({"servers": servers, "hidden": hidden,
                                     "split_bytes": split})
    placement = model_placement(config, digits)
    parts = len(placement.parts)
    assert parts < servers  # the premise: some server is left without a part
    with pytest.raises(ValueError, match=rf"--servers {servers}: the model has {parts} parts "
                                         rf".* use at most {parts} servers"):
        check_every_server_holds_something(config, placement)


def test_a_placement_that_leaves_a_server_empty_by_choice_is_warned_of_not_refused(digits):
    config = LaunchConfig.from_flat({"servers": 3, "placement": "dense0=0,dense1=0"})
    placement = model_placement(config, digits)
    check_every_server_holds_something(config, placement)  # 4 parts could fill 3 servers
    assert launch_warnings(config, digits)[0] == (
        "placement dense0=0,dense1=0: servers 1, 2 hold nothing: each is a process (and a "
        "port) that does no work")


def test_as_many_servers_as_parts_is_accepted(digits):
    config = LaunchConfig.from_flat({"servers": 4})  # dense0/1 weight and bias
    check_every_server_holds_something(config, model_placement(config, digits))


def test_dropped_rows_are_said_before_the_run(tmp_path):
    rows = ["a,b,label"] + [f"{i},{i % 5},{i % 2}" for i in range(40)] + ["nan,1,0", "1,inf,1"]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(rows) + "\n")
    config = LaunchConfig.from_flat({"dataset": f"csv:{path}"})
    data = load_dataset(config.train.dataset)
    assert data.dropped_rows == 2
    warnings = launch_warnings(config, data)
    assert warnings[0].startswith(f"csv:{path}: 2 rows dropped for NaN or ±inf values")


def test_far_more_processes_than_cores_is_warned_of(digits):
    cores = len(os.sched_getaffinity(0))
    many = LaunchConfig.from_flat({"servers": 1, "workers": 4 * cores})
    assert any(w.startswith(f"{4 * cores + 1} processes (1 server, {4 * cores} workers) on "
                            f"{cores} core{'s' * (cores != 1)}")
               for w in launch_warnings(many, digits))
    # A lab's cluster (a few processes per core) is not warned of.
    few = LaunchConfig.from_flat({"servers": 1, "workers": 4 * cores - 1})
    assert launch_warnings(few, digits) == ()


@pytest.mark.parametrize("argv", [["--servers", "100"], ["--resume", "EMPTY"]])
def test_a_refused_launch_prints_only_its_error(capsys, tmp_path, argv):
    from tinyps.cli import main

    (tmp_path / "empty").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    assert main(["launch", *argv, "--run-dir", str(tmp_path / "run")]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no placement table before the error, no summary
    assert out.err.startswith("tinyps launch: error: ") and out.err.count("\n") == 1, out.err
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_python_api_turns_the_plans_notes_into_warnings():
    from types import SimpleNamespace

    from tinyps.api import _warn

    plan = SimpleNamespace(resume_notes=("resume: round 40 is not usable",),
                           warnings=("csv:x.csv: 2 rows dropped for NaN or ±inf values",))
    with pytest.warns(UserWarning) as caught:
        _warn(plan)
    assert [str(w.message) for w in caught] == [*plan.resume_notes, *plan.warnings]
