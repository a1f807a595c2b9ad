"""The single-process trainer: the accuracy the issue asks for, repeatable by seed."""

import json

import numpy as np
import pytest

from tinyps import load_model
from tinyps.cli import main
from worker.baseline import TrainConfig, train_single_process


@pytest.fixture(scope="module")
def digits_run():
    return train_single_process(TrainConfig(dataset="digits", hidden=(128,), seed=0))


def test_digits_mlp_reaches_95_percent(digits_run):
    assert digits_run.test_accuracy >= 0.95
    assert digits_run.epoch_losses[-1] < digits_run.epoch_losses[0] / 5


def test_training_is_repeatable_by_seed(digits_run):
    again = train_single_process(TrainConfig(dataset="digits", hidden=(128,), seed=0))
    assert again.test_accuracy == digits_run.test_accuracy
    for name, value in digits_run.params.items():
        np.testing.assert_array_equal(again.params[name], value)


@pytest.mark.parametrize("optimizer,lr", [("momentum", 0.01), ("adam", 1e-3)])
def test_other_optimizers_learn_digits(optimizer, lr):
    result = train_single_process(
        TrainConfig(dataset="digits", optimizer=optimizer, lr=lr, epochs=8, seed=1))
    assert result.test_accuracy >= 0.93


def test_train_command_prints_json_and_writes_a_run_directory(capsys, tmp_path):
    run_dir = tmp_path / "train"
    assert main(["train", "--epochs", "2", "--json", "--seed", "3", "--run-dir",
                 str(run_dir)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)  # --json: standard output is one JSON document
    assert "test accuracy" in out.err
    assert summary["steps"] == 2 * 45  # 1,438 training images in batches of 32
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0.0 < summary["train_s"] <= summary["wall_s"]  # as launch --json has them
    assert [p["step"] for p in summary["test_curve"]] == [0, 45, 89]  # once an epoch, last
    samples = summary["samples_per_s"] * summary["train_s"]  # two epochs: no eval in the rate
    assert samples == pytest.approx(round(samples)) and 89 * 32 < samples <= 90 * 32
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["test_accuracy"] == summary["test_accuracy"] and saved["epochs"] == 2
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == list(range(90))
    model, params, _ = load_model(run_dir)
    assert model.sizes == (64, 128, 10) and set(params) == set(model.param_shapes())


def test_steps_override_epochs_as_in_a_launch(capsys, tmp_path):
    assert main(["train", "--steps", "7", "--json", "--run-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7


def test_the_baseline_takes_each_steps_lr_from_the_schedule(capsys, tmp_path):
    # lr times 1e-30 from the second update on: too small to move a float32 weight, so five
    # steps leave the weights of one (the same first batch), and a constant lr does not.
    small = dict(dataset="digits", hidden=(8,), seed=2)
    one = train_single_process(TrainConfig(steps=1, **small)).params
    frozen = train_single_process(TrainConfig(steps=5, lr_schedule="step:1:1e-30", **small))
    moving = train_single_process(TrainConfig(steps=5, **small)).params
    for name, value in one.items():
        np.testing.assert_array_equal(frozen.params[name], value)
    assert any(not np.array_equal(moving[n], v) for n, v in one.items())
    assert main(["train", "--steps", "5", "--lr-schedule", "warmup:2,cosine", "--json",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 5
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["lr_schedule"] == "warmup:2,cosine" and saved["lr"] == 0.1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "epochs must be >= 1, got 0"),
        (["train", "--hidden", "12,x"], "comma-separated integers"),
        (["train", "--lr", "-1"], "lr must be a positive finite number"),
        (["train", "--optimizer", "rmsprop"], "invalid choice"),
        (["train", "--lr-schedule", "step:10:0"], "--lr-schedule 'step:10:0': step's GAMMA "
                                                  "must be > 0, got 0"),
        (["train", "--steps", "5", "--lr-schedule", "warmup:5"],
         "a warmup of 5 updates is not shorter than the run's 5 updates per key"),
    ],
)
def test_bad_flags_are_refused_with_a_clear_error(argv, message, capsys, tmp_path):
    try:  # argparse refuses what it cannot read; the settings' own checks the rest
        code = main([*argv, "--run-dir", str(tmp_path / "never")])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_unknown_dataset_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    assert main(["train", "--dataset", "nosuch", "--epochs", "1", "--run-dir",
                 str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
