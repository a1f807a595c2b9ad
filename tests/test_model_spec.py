"""The model spec (`--model`): its grammar, the models build_model makes of it and the
errors it gives before anything starts; a CNN that learns digits; and CNNs through
`tinyps train` and `tinyps launch`, saved and loaded back with tinyps.load_model."""

import json
import subprocess
import sys

import numpy as np
import pytest

import tinyps
from tinyps.cli import main
from tinyps.config import LaunchConfig
from worker.baseline import train_single_process
from worker.layers import Conv2d, Dense, Flatten, MaxPool2d, ReLU
from worker.model import MLP
from worker.model_spec import ModelSpec, build_model, param_names, parse_spec
from worker.settings import TrainConfig


@pytest.mark.parametrize(("spec", "want"), [
    ("mlp:128", ModelSpec("mlp", (128,), (), "mlp:128")),
    ("mlp:256, 64", ModelSpec("mlp", (256, 64), (), "mlp:256, 64")),
    ("mlp:", ModelSpec("mlp", (), (), "mlp:")),
    ("cnn:8,16", ModelSpec("cnn", (8, 16), (), "cnn:8,16")),
    ("cnn:8/32,16", ModelSpec("cnn", (8,), (32, 16), "cnn:8/32,16")),
])
def test_the_grammar(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize(("spec", "message"), [
    ("rnn:8", "model spec 'rnn:8': unknown kind 'rnn'; expected one of mlp, cnn"),
    ("128", "model spec '128': expected KIND:WIDTHS"),
    ("mlp:12,x", "model spec 'mlp:12,x': hidden width 'x' is not a whole number"),
    ("mlp:1.5", "hidden width '1.5' is not a whole number"),
    ("cnn:", "model spec 'cnn:': expected at least one channel count"),
    ("cnn:8,0", "channel count must be >= 1, got 0"),
    ("cnn:8/", "model spec 'cnn:8/': expected at least one hidden width"),
    ("mlp:8/4", "'/' .* is for cnn"),
])
def test_bad_specs_are_refused_naming_the_spec_and_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)
    with pytest.raises(ValueError, match=message):
        TrainConfig(model=spec)  # when the settings are made, before any data loads


def test_mlp_specs_and_hidden_build_the_same_mlp():
    a = build_model("mlp:32,16", 64, (8, 8), 10, seed=4)
    b = build_model(TrainConfig(hidden=(32, 16)), 64, (8, 8), 10, seed=4)
    assert isinstance(a, MLP) and a.sizes == b.sizes == (64, 32, 16, 10)
    assert a.spec == "mlp:32,16" and b.spec == "mlp:32,16"
    for name, value in a.init_params().items():
        np.testing.assert_array_equal(value, b.init_params()[name])
    assert build_model("mlp:", 5, None, 3).sizes == (5, 3)  # softmax regression
    # --model wins over --hidden
    assert build_model(TrainConfig(hidden=(8,), model="mlp:4"), 5, None, 3).sizes == (5, 4, 3)


def test_a_cnn_spec_builds_conv_relu_pool_blocks_then_the_head():
    model = build_model("cnn:8,16/32", 64, (8, 8), 10, seed=1)
    kinds = [type(layer) for layer in model.layers]
    assert kinds == [Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d, Flatten, Dense, ReLU,
                     Dense]
    assert model.input_shape == (1, 8, 8) and model.n_classes == 10
    assert model.param_shapes() == {
        "conv0.weight": (8, 1, 3, 3), "conv0.bias": (8,), "conv1.weight": (16, 8, 3, 3),
        "conv1.bias": (16,), "dense0.weight": (16 * 2 * 2, 32), "dense0.bias": (32,),
        "dense1.weight": (32, 10), "dense1.bias": (10,)}
    conv = model.layers[0]
    assert (conv.kernel_size, conv.stride, conv.padding) == (3, 1, 1)


@pytest.mark.parametrize("spec", ["mlp:", "mlp:7,5", "cnn:3", "cnn:2,4/6,5"])
def test_param_names_need_no_data_and_agree_with_the_model(spec):
    assert param_names(spec) == list(build_model(spec, 64, (8, 8), 10).param_shapes())


@pytest.mark.parametrize(("args", "message"), [
    (("cnn:8", 20, None, 3), "model spec 'cnn:8': a CNN needs images, but the data set has "
                             "no image shape"),
    (("cnn:8", 63, (8, 8), 10), "image shape 8x8 does not match the data's 63 features"),
    (("cnn:2,2,2,2", 64, (8, 8), 10), "model spec 'cnn:2,2,2,2': after 3 conv block\\(s\\) "
                                      "the map is 1x1, too small to pool again; a 8x8 image "
                                      "takes at most 3 blocks"),
    (("mlp:4", 0, None, 3), "the data must have features and classes"),
])
def test_specs_that_do_not_fit_the_data_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_model(*args)


def test_a_cnn_that_does_not_fit_the_data_stops_a_launch_before_anything_starts(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="a CNN needs images"):
        tinyps.launch(dataset="synthetic", model="cnn:4", steps=2, run_dir=str(run_dir))
    assert not run_dir.exists()


def test_an_explicit_placement_names_conv_layers():
    LaunchConfig.from_flat({"model": "cnn:4,8", "servers": 2,
                            "placement": "conv0=0,conv1=1,dense0=1"})
    with pytest.raises(ValueError, match="dense0"):
        LaunchConfig.from_flat({"model": "cnn:4,8", "servers": 2, "placement": "conv0=0,conv1=1"})


def test_a_small_cnn_learns_digits(digits):
    result = train_single_process(TrainConfig(model="cnn:8", steps=150, lr=0.05, seed=0),
                                  data=digits)
    assert result.test_accuracy > 0.8  # chance is 0.1; seeded, it reaches 0.92
    assert result.steps == 150 and set(result.params) == set(param_names("cnn:8"))


def test_tinyps_train_a_cnn_then_load_it_back(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--model", "cnn:4", "--steps", "30", "--run-dir", str(run_dir),
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    assert json.loads((run_dir / "config.json").read_text())["model"] == "cnn:4"
    model, params, _ = tinyps.load_model(run_dir)
    assert model.spec == "cnn:4" and model.input_shape == (1, 8, 8)
    assert list(params) == list(model.param_shapes())
    data = tinyps.load_dataset("digits")
    _, accuracy = model.evaluate(params, data.X_test, data.y_test)
    assert accuracy == summary["test_accuracy"]


def _launch(tmp_path, *args):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tinyps", "launch", "--model", "cnn:4",
                           "--workers", "2", "--servers", "2", "--run-dir", str(run_dir),
                           "--json", *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), run_dir


@pytest.mark.slow  # about 20 s on 2 busy cores: processes, and kernels compiled once
def test_tinyps_launch_trains_a_cnn_with_its_4d_weights_split_by_rows(tmp_path):
    # conv0.weight is (4, 1, 3, 3): 144 bytes, cut into row ranges of 36-byte rows.
    summary, run_dir = _launch(tmp_path, "--steps", "6", "--split-bytes", "100")
    split = summary["placement"]["conv0.weight"]
    assert [part["server"] for part in split] == [0, 1]
    assert split[0]["rows"] == [0, 2] and split[1]["rows"] == [2, 4]
    assert 0 <= summary["test_accuracy"] <= 1 and summary["steps_per_worker"] == 6
    assert sum(s["params"] for s in summary["per_server"]) == 4 * 9 + 4 + 64 * 10 + 10
    model, params, placement = tinyps.load_model(run_dir)
    assert model.spec == "cnn:4" and placement == summary["placement"]
    data = tinyps.load_dataset("digits")
    _, accuracy = model.evaluate(params, data.X_test, data.y_test)
    assert accuracy == summary["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("--mode", "sync", "--precision", "bf16", "--aggregate", "median", "--poison-workers",
     "1", "--poison", "label_flip", "--steps", "6"),
    ("--mode", "sync", "--dp-noise", "0.8", "--dp-seed", "1", "--steps", "6"),
])
def test_tinyps_launch_a_cnn_in_16_bits_robust_and_poisoned_or_private(tmp_path, args):
    summary, _ = _launch(tmp_path, *args)
    assert summary["steps_per_worker"] == 6 and 0 <= summary["test_accuracy"] <= 1
