"""Mixed precision: the loss scaler against torch.amp.GradScaler, gradient underflow with and
without scaling, halved traffic, and overflowing steps that are skipped, never applied."""

import numpy as np
import pytest

import tinyps
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.store import Store
from ps.store_config import StoreConfig
from worker.precision import GROWTH_INTERVAL, INIT_SCALE, LossScaler, Precision, PrecisionConfig

# Recorded from torch 2.13.0: torch.amp.GradScaler("cpu", init_scale=1024, growth_factor=2,
# backoff_factor=0.5, growth_interval=3), one step per entry of PATTERN (True: the gradients
# held inf), get_scale() after each update().
PATTERN = [False, False, False, True, False, False, False, False, True, True, False, False,
           False]
TORCH_SCALES = [1024.0, 1024.0, 2048.0, 1024.0, 1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 512.0,
                512.0, 512.0, 1024.0]


def test_the_scaler_follows_grad_scalers_trajectory():
    scaler = LossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                        growth_interval=3)
    seen = []
    for found_inf in PATTERN:
        scaler.update(found_inf)
        seen.append(scaler.get_scale())
    assert seen == TORCH_SCALES


def test_the_scale_is_float32_and_never_grows_to_inf():
    # torch: GradScaler(init_scale=3e38, growth_interval=1) keeps 3.0000000054977558e+38.
    scaler = LossScaler(init_scale=3.0e38, growth_interval=1)
    scaler.update(False)
    assert scaler.get_scale() == 3.0000000054977558e38


def test_scale_and_unscale():
    scaler = LossScaler(init_scale=8.0)
    assert scaler.scale(0.5) == 4.0
    grads = {"w": np.array([8.0, -16.0], np.float32)}
    assert scaler.unscale(grads) is True
    np.testing.assert_array_equal(grads["w"], [1.0, -2.0])
    assert scaler.unscale({"w": np.array([np.inf], np.float32)}) is False
    off = LossScaler(enabled=False)
    off.update(True)
    assert (off.get_scale(), off.scale(0.5)) == (1.0, 0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"init_scale": 0.0}, "init_scale"), ({"growth_factor": 1.0}, "growth_factor"),
    ({"backoff_factor": 1.5}, "backoff_factor"), ({"growth_interval": 0}, "growth_interval"),
])
def test_bad_scaler_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**kwargs)


def test_sync_skips_a_step_that_any_worker_found_non_finite():
    key = Key("w", (2,), 0, 2)
    store = Store(StoreConfig(mode="sync", workers=2))
    store.init([key], OptimizerConfig("sgd", lr=1.0), {key.id: np.ones(2, np.float32)})
    store.push(0, 0, {key.id: (np.zeros(0, np.float32), 0)}, skip=True)
    store.push(1, 0, {key.id: (np.full(2, 4.0, np.float32), 0)}, scale=2.0)
    _, values, version = store.pull(None, 0, None, 1.0)[0]
    np.testing.assert_array_equal(values, 1.0)  # nobody's gradient was applied...
    assert version == 1  # ...but the step is over: versions still count steps
    assert store.was_skipped(0, 0) and store.was_skipped(1, 0)
    store.push(0, 1, {key.id: (np.full(2, 4.0, np.float32), 1)}, scale=2.0)
    store.push(1, 1, {key.id: (np.full(2, 4.0, np.float32), 1)}, scale=2.0)
    np.testing.assert_array_equal(store.pull(None, 0, None, 1.0)[0][1], -1.0)  # 1 - 4/2
    assert store.stats()["skipped_steps"] == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    settings = {"servers": 2, "workers": 2, "mode": "sync", "epochs": 10, "seed": 0}
    out = {}
    for name, extra in {"fp32": {"precision": "fp32"},
                        "fp16": {"precision": "fp16"},
                        "fp16_unscaled": {"precision": "fp16", "loss_scale": "off"},
                        "bf16": {"precision": "bf16"}}.items():
        out[name], _ = tinyps.launch(run_dir=str(tmp_path_factory.mktemp(name)), **settings,
                                     **extra)
    return out


def test_loss_scaling_prevents_underflow_and_keeps_fp32_accuracy(runs):
    unscaled = runs["fp16_unscaled"]["grad_underflow_fraction"]
    scaled = runs["fp16"]["grad_underflow_fraction"]
    assert unscaled > 1e-4 and unscaled > 20 * scaled, (unscaled, scaled)
    assert runs["fp16"]["loss_scale_final"] == 65536.0
    assert abs(runs["fp16"]["test_accuracy"] - runs["fp32"]["test_accuracy"]) <= 0.01
    assert abs(runs["bf16"]["test_accuracy"] - runs["fp32"]["test_accuracy"]) <= 0.01
    assert runs["fp32"]["grad_underflow_fraction"] == 0.0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_16_bit_runs_move_half_the_bytes(runs, precision):
    for key in ("bytes_pushed", "bytes_pulled"):
        ratio = runs[precision][key] / runs["fp32"][key]
        assert 0.475 <= ratio <= 0.525, (key, ratio)


def test_an_overflowing_step_is_skipped_and_never_reaches_the_weights(tmp_path):
    # A static scale of 2^24 makes the first layer's fp16 gradients overflow at once.
    summary, run_dir = tinyps.launch(servers=1, workers=2, mode="sync", steps=30,
                                     precision="fp16", loss_scale=2.0**24,
                                     run_dir=str(tmp_path))
    assert summary["skipped_steps"] > 0
    _, weights, _ = tinyps.load_model(run_dir)
    assert weights and all(np.isfinite(w).all() for w in weights.values())


def test_init_scale_and_growth_interval_reach_the_workers_scalers(tmp_path):
    # 25 good steps from 1024, doubling every 10: 1024 -> 2048 (step 10) -> 4096 (step 20).
    summary, _ = tinyps.launch(servers=1, workers=2, mode="sync", steps=25, precision="fp16",
                               init_scale=1024.0, growth_interval=10, run_dir=str(tmp_path))
    assert summary["skipped_steps"] == 0
    assert summary["loss_scale_final"] == 4096.0


@pytest.mark.parametrize("settings, exc, message", [
    ({"precision": "fp16", "growth_interval": 0}, ValueError, "growth_interval must be >= 1"),
    ({"precision": "fp16", "growth_interval": 2.5}, TypeError, "growth_interval must be an int"),
    ({"precision": "fp16", "growth_interval": True}, TypeError, "growth_interval must be an int"),
    ({"precision": "fp16", "init_scale": 0.0}, ValueError, "init_scale must be positive"),
    ({"precision": "fp16", "init_scale": float("inf")}, ValueError, "init_scale must be positive"),
    ({"precision": "bf16", "init_scale": 1024.0}, ValueError, "loss scale is off"),
    ({"precision": "fp16", "loss_scale": 512.0, "growth_interval": 10}, ValueError,
     "loss scale is 512.0"),
    ({"precision": "fp32", "loss_scale": "dynamic", "init_scale": 8.0}, None, None),
])
def test_dynamic_scaling_settings_are_checked(settings, exc, message):
    if exc is None:
        scaler, dynamic = PrecisionConfig(**settings).scaler()
        assert dynamic and scaler.get_scale() == 8.0
        tinyps.LaunchConfig.from_flat(settings)
        return
    with pytest.raises(exc, match=message):
        tinyps.LaunchConfig.from_flat(settings)


def test_the_cli_defaults_are_grad_scalers(capsys):
    from tinyps.cli import main

    precision = tinyps.LaunchConfig().precision
    assert (precision.init_scale, precision.growth_interval) == (INIT_SCALE, GROWTH_INTERVAL)
    assert (INIT_SCALE, GROWTH_INTERVAL) == (65536.0, 2000)  # torch.amp.GradScaler's
    assert main(["launch", "--growth-interval", "0"]) == 2
    assert "growth_interval" in capsys.readouterr().err


def test_precision_names_are_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("fp8")
    with pytest.raises(ValueError, match="loss_scale must be auto"):
        tinyps.LaunchConfig.from_flat({"precision": "fp16", "loss_scale": "sometimes"})


def test_loss_mean_over_divides_the_gradient_by_n_instead_of_the_batch():
    # SGD on sum(loss) / 128 with batch 32 is SGD on the batch mean with a quarter of the lr:
    # bit for bit, since both multiply by a power of two.
    from worker.baseline import TrainConfig, train_single_process
    base = dict(steps=5, batch_size=32, seed=0, eval_every=0)
    divided = train_single_process(TrainConfig(lr=0.1, loss_mean_over=128, **base))
    plain = train_single_process(TrainConfig(lr=0.025, **base))
    for name, value in plain.params.items():
        np.testing.assert_array_equal(divided.params[name], value, err_msg=name)
    assert divided.final_train_loss == plain.final_train_loss  # the reported loss: the mean
    with pytest.raises(ValueError, match="loss_mean_over must be >= 1"):
        TrainConfig(loss_mean_over=0)
    with pytest.raises(ValueError, match="loss-mean-over does not apply"):
        tinyps.LaunchConfig.from_flat({"dp_noise": 1.0, "loss_mean_over": 64})


def test_loss_mean_over_reaches_the_workers(tmp_path):
    # Adam on gradients 2^-24 / 2^-5 smaller: fp16 without scaling loses most of them.
    settings = dict(servers=1, workers=1, steps=5, optimizer="adam", lr=1e-3,
                    loss_mean_over=2**24, precision="fp16", loss_scale="off")
    summary, _ = tinyps.launch(run_dir=str(tmp_path), **settings)
    assert summary["grad_underflow_fraction"] > 0.5
