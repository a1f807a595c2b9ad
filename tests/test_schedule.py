"""Learning-rate schedules (ps/schedule.py) against torch's schedulers (stored results), their
refusals, and the servers applying them by each key's update count."""

import json
import re

import grpc
import numpy as np
import pytest

from ps import ps_pb2, ps_pb2_grpc
from ps.checkpoint import read_checkpoint, write_checkpoint
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.schedule import check_fits, parse_schedule
from ps.server import serve
from ps.snapshot import KeyState, Snapshot
from ps.store import Store
from ps.store_config import StoreConfig
from worker.settings import TrainConfig

# torch 2.13.0: optimizer.param_groups[0]["lr"] before each of 30 steps of an SGD with lr 0.1
# and the scheduler stepped after it, recorded once (torch is not a test dependency):
#   step:7:0.5           StepLR(step_size=7, gamma=0.5)
#   cosine:20            CosineAnnealingLR(T_max=20)
#   cosine:12:0.01       CosineAnnealingLR(T_max=12, eta_min=0.01)
#   warmup:10            LinearLR(start_factor=0.1, total_iters=10)
#   warmup:5:0.25        LinearLR(start_factor=0.25, total_iters=5)
#   warmup:8,cosine:22   SequentialLR([LinearLR(start_factor=1/8, total_iters=8),
#                                      CosineAnnealingLR(T_max=22)], milestones=[8])
#   warmup:4,step:5:0.1  SequentialLR([LinearLR(start_factor=1/4, total_iters=4),
#                                      StepLR(step_size=5, gamma=0.1)], milestones=[4])
TORCH = {
    "step:7:0.5": [0.1] * 7 + [0.05] * 7 + [0.025] * 7 + [0.0125] * 7 + [0.00625] * 2,
    "cosine:20": [
        0.1, 0.0993844170297569, 0.09755282581475769, 0.0945503262094184, 0.0904508497187474,
        0.08535533905932739, 0.07938926261462367, 0.07269952498697735, 0.06545084971874739,
        0.05782172325201156, 0.05000000000000001, 0.04217827674798848, 0.03454915028125264,
        0.027300475013022667, 0.020610737385376353, 0.014644660940672629, 0.009549150281252633,
        0.005449673790581611, 0.0024471741852423235, 0.0006155829702431171, 0.0,
        0.0006155829702431115, 0.0024471741852423123, 0.005449673790581605,
        0.009549150281252621, 0.014644660940672615, 0.020610737385376336,
        0.027300475013022647, 0.03454915028125261, 0.042178276747988436],
    "cosine:12:0.01": [
        0.1, 0.09846666218300808, 0.09397114317029975, 0.08681980515339464, 0.07750000000000001,
        0.06664685702961345, 0.055000000000000014, 0.04335314297038658, 0.032500000000000015,
        0.023180194846605367, 0.01602885682970026, 0.011533337816991932, 0.01,
        0.011533337816991927, 0.016028856829700254, 0.023180194846605343, 0.03249999999999997,
        0.04335314297038656, 0.05499999999999997, 0.06664685702961338, 0.07749999999999996,
        0.08681980515339459, 0.09397114317029968, 0.09846666218300802, 0.09999999999999995,
        0.09846666218300802, 0.0939711431702997, 0.0868198051533946, 0.07749999999999999,
        0.0666468570296134],
    "warmup:10": [
        0.010000000000000002, 0.019000000000000003, 0.028000000000000008, 0.03700000000000001,
        0.04600000000000001, 0.055000000000000014, 0.06400000000000002, 0.07300000000000002,
        0.08200000000000003, 0.09100000000000004] + [0.10000000000000005] * 20,
    "warmup:5:0.25": [0.025, 0.04000000000000001, 0.05500000000000001, 0.07, 0.085]
                     + [0.1] * 25,
    "warmup:8,cosine:22": [
        0.0125, 0.0234375, 0.034375, 0.0453125, 0.05625, 0.0671875, 0.078125,
        0.08906250000000002, 0.1, 0.09949107209404665, 0.09797464868072488,
        0.09548159976772592, 0.09206267664155907, 0.08778747871771292, 0.08274303669726427,
        0.07703204087277989, 0.07077075065009433, 0.06408662784207149, 0.05711574191366425,
        0.05000000000000002, 0.04288425808633575, 0.035913372157928516, 0.029229249349905687,
        0.02296795912722014, 0.017256963302735753, 0.012212521282287095, 0.007937323358440947,
        0.004518400232274089, 0.002025351319275132, 0.0005089279059533658],
    "warmup:4,step:5:0.1": [
        0.025, 0.043750000000000004, 0.06250000000000001, 0.08125000000000002]
        + [0.1] * 5 + [0.010000000000000002] * 5 + [0.0010000000000000002] * 5
        + [0.00010000000000000003] * 5 + [1.0000000000000004e-05] * 5
        + [1.0000000000000004e-06],
}


@pytest.mark.parametrize("spec", TORCH)
def test_a_schedule_gives_torchs_lr_at_each_of_30_updates(spec):
    # torch steps its schedulers by multiplying (StepLR, LinearLR) or by a recurrence
    # (CosineAnnealingLR): its float rounding differs from these closed forms in the last bits.
    got = [OptimizerConfig(lr=0.1, lr_schedule=spec).lr_at(t) for t in range(30)]
    assert got == pytest.approx(TORCH[spec], rel=1e-12, abs=1e-17)


def test_a_cosine_without_t_max_ends_at_the_runs_planned_updates():
    # sync: one update per step; async and ssp: one per worker's push.
    sync = OptimizerConfig(lr=0.1, lr_schedule="cosine", planned_steps=10)
    assert [sync.lr_at(t) for t in range(30)] == pytest.approx(
        [OptimizerConfig(lr=0.1, lr_schedule="cosine:10").lr_at(t) for t in range(30)])
    assert sync.lr_at(10) == 0.0
    assert sync.lr_at(20, updates_per_step=2) == 0.0  # 2 async workers x 10 steps
    warm = OptimizerConfig(lr=0.1, lr_schedule="warmup:8,cosine", planned_steps=30)
    assert [warm.lr_at(t) for t in range(30)] == pytest.approx(TORCH["warmup:8,cosine:22"],
                                                               rel=1e-12, abs=1e-17)


def test_constant_is_no_schedule():
    assert OptimizerConfig(lr_schedule="constant") == OptimizerConfig()
    assert OptimizerConfig(lr=0.3, lr_schedule="constant").lr_at(1000) == 0.3


@pytest.mark.parametrize("spec, words", [
    ("linear", "'linear' is none of them"),
    ("step:0:0.5", "step's EVERY must be >= 1, got 0"),
    ("step:2.5:0.5", "step's EVERY must be an integer, got '2.5'"),
    ("step:10", "'step:10' is none of them"),
    ("step:10:0", "step's GAMMA must be > 0, got 0"),
    ("step:10:-0.5", "step's GAMMA must be > 0, got -0.5"),
    ("step:10:nan", "step's GAMMA must be finite"),
    ("cosine:0", "cosine's T_MAX must be >= 1, got 0"),
    ("cosine:10:-1", "cosine's ETA_MIN must be >= 0, got -1"),
    ("cosine:1:2:3", "is none of them"),
    ("warmup:-5", "warmup's STEPS must be >= 1, got -5"),
    ("warmup:0,cosine:5", "warmup's STEPS must be >= 1, got 0"),
    ("warmup:5:0", "warmup's START (a factor of lr) must be in (0, 1], got 0"),
    ("warmup:5:1.5", "must be in (0, 1], got 1.5"),
    ("warmup:5,", "expected warmup:STEPS[:START][,THEN]"),
    ("warmup:5,warmup:3", "a warmup comes first, and once"),
    ("warmup:5,cosine:x", "cosine's T_MAX must be an integer, got 'x'"),
])
def test_a_bad_spec_is_refused_naming_the_flag_the_text_and_the_problem(spec, words):
    with pytest.raises(ValueError, match="--lr-schedule") as err:
        parse_schedule(spec)
    assert repr(spec) in str(err.value) and words in str(err.value)
    with pytest.raises(ValueError, match=re.escape(words)):
        TrainConfig(lr_schedule=spec)  # refused where the settings are made


def test_a_cosine_without_t_max_needs_the_planned_steps():
    with pytest.raises(ValueError, match="needs the run's planned steps"):
        OptimizerConfig(lr_schedule="warmup:3,cosine")
    with pytest.raises(ValueError, match="planned_steps must be >= 1, got 0"):
        OptimizerConfig(lr_schedule="cosine", planned_steps=0)
    TrainConfig(lr_schedule="cosine")  # the steps are known once the data is: not refused


def test_a_warmup_as_long_as_the_run_is_refused():
    check_fits("warmup:9,cosine", 10)
    with pytest.raises(ValueError, match="a warmup of 10 updates is not shorter than the "
                                         "run's 10 updates per key"):
        check_fits("warmup:10,cosine", 10)


def test_the_planned_steps_go_to_the_servers_only_when_the_schedule_ends_by_them():
    assert "planned_steps" not in TrainConfig(lr_schedule="step:5:0.5").optimizer_settings(40)
    assert TrainConfig(lr_schedule="cosine").optimizer_settings(40)["planned_steps"] == 40
    assert "lr_schedule" not in TrainConfig().optimizer_settings(40)


# ---------------------------------------------------------------------------------------------
# The servers: each key's update uses the schedule at the key's version.

W = Key("w", (4,), 0, 4)


def _store(mode, workers, optimizer, **kw):
    store = Store(StoreConfig(mode=mode, workers=workers, **kw))
    store.init([W], optimizer, {W.id: np.ones(4, np.float32)})
    return store


def _value(store):
    return store.pull(None, 0, None, 1.0)[0][1]


def _ones():
    return np.ones(4, np.float32)


def test_sync_steps_the_lr_once_per_step_of_all_workers():
    # lr 1, 0.5 every 2 updates; mean gradient 1: moves 1 + 1 + 0.5 + 0.5 + 0.25 + 0.25.
    store = _store("sync", 2, OptimizerConfig(lr=1.0, lr_schedule="step:2:0.5"))
    for step in range(6):
        for worker in range(2):
            store.push(worker, step, {W.id: (_ones(), step)})
    np.testing.assert_array_equal(_value(store), 1.0 - 3.5)


def test_async_counts_every_workers_push_as_an_update():
    # 2 workers x 2 steps = 4 updates at lr 1, 1, 0.5, 0.5 (powers of two: exact).
    store = _store("async", 2, OptimizerConfig(lr=1.0, lr_schedule="step:2:0.5"))
    for step in range(2):
        for worker in range(2):
            store.push(worker, step, {W.id: (_ones(), 2 * step + worker)})
    np.testing.assert_array_equal(_value(store), 1.0 - 3.0)


def test_async_cosine_without_t_max_anneals_over_workers_times_steps():
    # planned 2 steps x 2 workers: lr 1 at counts 0..3 of cos over T_MAX 4, which sum to 2.5.
    store = _store("async", 2, OptimizerConfig(lr=1.0, lr_schedule="cosine", planned_steps=2))
    for step in range(2):
        for worker in range(2):
            store.push(worker, step, {W.id: (_ones(), 2 * step + worker)})
    np.testing.assert_allclose(_value(store), 1.0 - 2.5, rtol=1e-6)


def test_staleness_lr_divides_the_scheduled_lr():
    # lr 1 halved at every update. Worker 0's step 0 at version 0 (staleness 0): lr 1; worker
    # 1's step 0 read at 0, applied at 1 (staleness 1): 0.5; worker 0's step 1 read at 0,
    # applied at 2 (staleness 2): 0.25 / 2.
    store = _store("async", 2, OptimizerConfig(lr=1.0, lr_schedule="step:1:0.5"),
                   staleness_lr=True)
    store.push(0, 0, {W.id: (_ones(), 0)})
    store.push(1, 0, {W.id: (_ones(), 0)})
    store.push(0, 1, {W.id: (_ones(), 0)})
    np.testing.assert_array_equal(_value(store), 1.0 - (1 + 0.5 + 0.125))


def test_adams_bias_correction_counts_its_own_steps_whatever_the_lr():
    # A constant gradient has bias-corrected moments of 1 at every step (if the step count is
    # right): each update moves the weight by its scheduled lr, 0.1, 0.05, 0.025 (up to eps).
    store = _store("async", 1, OptimizerConfig("adam", lr=0.1, lr_schedule="step:1:0.5"))
    for step in range(3):
        store.push(0, step, {W.id: (_ones(), step)})
    assert store.snapshot().keys[0].optimizer["step"] == 3
    np.testing.assert_allclose(_value(store), 1.0 - 0.175, rtol=1e-6)


@pytest.fixture
def stub():
    running = serve(mode="sync", workers=1)
    with grpc.insecure_channel(running.address) as channel:
        yield ps_pb2_grpc.ParameterServerStub(channel), running
    running.stop(0)


@pytest.mark.parametrize("settings, words", [
    ({"lr_schedule": "step:0:0.5"}, "step's EVERY must be >= 1, got 0"),
    ({"lr_schedule": "cosine"}, "needs the run's planned steps"),
    ({"lr_schedule": "cosine", "planned_steps": -3}, "planned_steps must be >= 1, got -3"),
])
def test_a_bad_schedule_in_init_is_invalid_argument_and_keeps_no_layout(stub, settings, words):
    call, running = stub
    request = ps_pb2.InitRequest(
        optimizer=ps_pb2.OptimizerSettings(name="sgd", lr=0.1, beta1=0.9, beta2=0.999,
                                           eps=1e-8, **settings),
        keys=[ps_pb2.KeySpec(name="w", tensor_shape=[4], start=0, stop=4)])
    with pytest.raises(grpc.RpcError) as err:
        call.Init(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert running.store.layout() == ()


# ---------------------------------------------------------------------------------------------
# Checkpoints carry the schedule; those written before it existed still load.


def _snapshot(optimizer):
    state = KeyState(W, np.ones(4, np.float32), 7, np.array([7], np.int64))
    return Snapshot("sync", 1, optimizer, [state], {}, seq=7)


def test_a_checkpoint_carries_the_schedule_and_the_planned_steps(tmp_path):
    optimizer = OptimizerConfig(lr=0.2, lr_schedule="warmup:3,cosine", planned_steps=40)
    assert read_checkpoint(write_checkpoint(tmp_path, _snapshot(optimizer))).optimizer == optimizer


def test_a_checkpoint_from_before_schedules_loads_with_a_constant_lr(tmp_path):
    path = write_checkpoint(tmp_path, _snapshot(OptimizerConfig(lr=0.2)))
    with np.load(path, allow_pickle=False) as npz:
        arrays = dict(npz)
    meta = json.loads(str(arrays["meta"][()]))
    del meta["optimizer"]["lr_schedule"], meta["optimizer"]["planned_steps"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    assert read_checkpoint(path).optimizer == OptimizerConfig(lr=0.2)
