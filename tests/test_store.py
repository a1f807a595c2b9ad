"""The store on its own (no gRPC): consistency modes, step rules, refusals that change nothing."""

import threading

import numpy as np
import pytest

from kernels import bf16_decode, bf16_encode, fp16_decode, fp16_encode
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.packed import Packed
from ps.store import Store
from ps.store_config import StoreConfig
from ps.store_errors import (
    BadRequest,
    LayoutConflict,
    NotInitialised,
    StepOutOfRange,
    UnknownKey,
    WaitTimeout,
)

W_KEY = Key("w", (4,), 0, 4)
SGD = OptimizerConfig("sgd", lr=0.5)


def _store(mode="sync", workers=2, value=1.0, **kw):
    store = Store(StoreConfig(mode=mode, workers=workers, **kw))
    store.init([W_KEY], SGD, {W_KEY.id: np.full(4, value, np.float32)})
    return store


def _value(store):
    return store.pull(None, 0, None, 1.0)[0][1]


def _grad(x):
    return np.full(4, x, np.float32)


def test_async_constant_gradient_moves_the_weight_by_w_lr_g():
    store = _store("async", workers=4)
    for w in range(4):
        store.push(w, 0, {W_KEY.id: (_grad(0.25), 0)})
    np.testing.assert_array_equal(_value(store), 1.0 - 4 * 0.5 * 0.25)  # powers of two: exact


def test_sync_applies_the_mean_once_all_workers_pushed():
    store = _store("sync", workers=2)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    np.testing.assert_array_equal(_value(store), 1.0)  # waiting for worker 1
    store.push(1, 0, {W_KEY.id: (_grad(3.0), 0)})
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 2.0)
    assert store.stats()["updates"] == 1


def test_sync_pull_waits_for_the_barrier():
    store = _store("sync", workers=2)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    with pytest.raises(WaitTimeout, match="pull of step 1 by worker 0 still waiting"):
        store.pull(None, 0, 1, timeout=0.05)
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.pull(None, 0, 1, timeout=10)))
    waiter.start()
    store.push(1, 0, {W_KEY.id: (_grad(1.0), 0)})
    waiter.join(10)
    assert got and got[0][0][2] == 1  # answered with version 1


def test_a_repeated_push_is_acknowledged_and_applied_once():
    store = _store("async", workers=1)
    assert store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)}) == (1, 0, 0)
    assert store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)}) == (0, 1, 0)
    np.testing.assert_array_equal(_value(store), 0.5)


@pytest.mark.parametrize("step", [-1, 2])
def test_steps_that_are_not_the_workers_are_refused_and_use_up_nothing(step):
    store = _store("async", workers=1)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    with pytest.raises(StepOutOfRange):
        store.push(0, step, {W_KEY.id: (_grad(1.0), 0)})
    assert store.push(0, 1, {W_KEY.id: (_grad(1.0), 1)}) == (1, 0, 0)  # step 1 still free


@pytest.mark.parametrize(
    ("grads", "error", "message"),
    [
        ({W_KEY.id: (np.ones(3, np.float32), 0)}, BadRequest, r"expected float32 \(4,\)"),
        ({W_KEY.id: (np.ones(4, np.float64), 0)}, BadRequest, "got float64"),
        ({W_KEY.id: (_grad(np.nan), 0)}, BadRequest, "inf or NaN"),
        ({W_KEY.id: (_grad(1.0), 5)}, BadRequest, "computed from version 5"),
        ({("nope", 0): (_grad(1.0), 0)}, UnknownKey, "no tensor 'nope'"),
        ({W_KEY.id: (_grad(1.0), 0), ("nope", 0): (_grad(1.0), 0)}, UnknownKey, "nope"),
    ],
)
def test_bad_pushes_change_no_state(grads, error, message):
    store = _store("async", workers=1)
    before = store.stats()
    with pytest.raises(error, match=message):
        store.push(0, 0, grads)
    np.testing.assert_array_equal(_value(store), 1.0)
    after = store.stats()
    assert (after["pushes"], after["updates"], after["clocks"]) == (
        before["pushes"], before["updates"], before["clocks"])


def test_worker_out_of_range_is_refused():
    with pytest.raises(BadRequest, match="worker 2 is out of range"):
        _store("async", workers=2).push(2, 0, {W_KEY.id: (_grad(1.0), 0)})


def test_push_and_pull_before_init_are_refused():
    store = Store(StoreConfig())
    with pytest.raises(NotInitialised):
        store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    with pytest.raises(NotInitialised):
        store.pull(None, 0, None, 1.0)


def test_results_are_named_and_still_unpack_as_tuples():
    store = Store(StoreConfig(mode="async", workers=1))
    result = store.init([W_KEY], SGD, {W_KEY.id: _grad(1.0)})
    assert (result.created, result.pending) == (True, 0)
    pushed = store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    assert (pushed.accepted, pushed.duplicates, pushed.staleness_max) == (1, 0, 0)
    accepted, duplicates, staleness = store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    assert (accepted, duplicates, staleness) == (0, 1, 0)
    versions = store.versions()
    assert versions == (True, 1, 1, {0: 1})
    assert (versions.initialised, versions.min_version, versions.max_version,
            versions.clocks) == (True, 1, 1, {0: 1})


def test_a_pull_with_step_none_is_answered_at_once_and_a_negative_step_is_refused():
    store = _store("sync", workers=2)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})  # step 0 half in: pulls of step 1 wait
    assert store.pull(None, 0, None, timeout=0.0)[0][2] == 0  # no barrier, no start line
    with pytest.raises(StepOutOfRange, match=r"step must be >= 0 \(or None: at once\), got -1"):
        store.pull(None, 0, -1, timeout=0.0)
    assert store.stats()["pulls"] == 1  # the refused one is not counted


@pytest.mark.parametrize(("mode", "skipped"), [("sync", [True, True]),
                                               ("async", [True, False])])
def test_a_skipped_step_is_everyones_in_sync_and_the_workers_own_otherwise(mode, skipped):
    store = _store(mode, workers=2)
    store.push(0, 0, {W_KEY.id: (np.zeros(0, np.float32), 0)}, skip=True)
    store.push(1, 0, {W_KEY.id: (_grad(1.0), 0)})
    assert [store.was_skipped(w, 0) for w in range(2)] == skipped
    assert not store.was_skipped(0, 1)
    assert store.stats()["skipped_steps"] == 1


def test_the_first_init_wins_and_other_shapes_are_refused():
    store = _store(value=1.0)
    created, pending = store.init([W_KEY], SGD, {W_KEY.id: _grad(7.0)})
    assert (created, pending) == (False, 0)
    np.testing.assert_array_equal(_value(store), 1.0)  # the first values stay
    with pytest.raises(LayoutConflict, match="another layout"):
        store.init([Key("w", (5,), 0, 5)], SGD, {})
    with pytest.raises(LayoutConflict, match="optimizer"):
        store.init([W_KEY], OptimizerConfig("adam"), {})


def test_staleness_is_counted_and_the_staleness_lr_divides_the_step():
    store = _store("async", workers=2, staleness_lr=True)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})  # staleness 0: w = 1 - 0.5 = 0.5
    store.push(0, 1, {W_KEY.id: (_grad(1.0), 1)})  # staleness 0: w = 0
    store.push(1, 0, {W_KEY.id: (_grad(1.0), 0)})  # staleness 2: lr / 2 -> w = -0.25
    np.testing.assert_array_equal(_value(store), -0.25)
    stats = store.stats()
    assert stats["staleness_histogram"] == [2, 0, 1]
    assert (stats["staleness_max"], stats["staleness_sum"]) == (2, 2)


def test_gradients_staler_than_the_limit_are_dropped_and_counted():
    store = _store("async", workers=2, max_staleness=1)
    store.push(0, 0, {W_KEY.id: (_grad(1.0), 0)})
    store.push(0, 1, {W_KEY.id: (_grad(1.0), 1)})
    store.push(1, 0, {W_KEY.id: (_grad(1.0), 0)})  # staleness 2 > 1: dropped
    np.testing.assert_array_equal(_value(store), 0.0)
    assert store.stats()["dropped_stale"] == 1


def _start(store, workers):
    """Every worker asks for step 0 at once (the start line waits for all of them)."""
    threads = [threading.Thread(target=store.pull, args=(None, w, 0, 10.0))
               for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)


def test_a_run_starts_when_every_worker_has_asked_for_step_0():
    store = _store("async", workers=2)
    with pytest.raises(WaitTimeout, match=r"waiting at the start for workers \[1\]"):
        store.pull(None, 0, 0, timeout=0.05)
    _start(store, 2)
    store.pull(None, 0, 0, timeout=0.05)  # once started, step 0 is answered at once


def test_ssp_holds_a_worker_within_k_clocks_of_the_slowest():
    store = _store("ssp", workers=2, staleness=1)
    _start(store, 2)
    for step in range(2):  # worker 0 runs ahead: clocks 2 and 0
        store.pull(None, 0, step, 1.0)
        store.push(0, step, {W_KEY.id: (_grad(0.0), step)})
    with pytest.raises(WaitTimeout):
        store.pull(None, 0, 2, timeout=0.05)  # 2 - 0 > K = 1
    store.push(1, 0, {W_KEY.id: (_grad(0.0), 0)})
    store.pull(None, 0, 2, timeout=1.0)  # 2 - 1 <= K: answered


def test_a_pull_beyond_the_workers_own_clock_is_refused():
    with pytest.raises(StepOutOfRange, match="its next step is 0"):
        _store("sync", workers=2).pull(None, 0, 3, 1.0)


# ---------------------------------------------------------------------------------------------
# 16-bit gradients pushed as their codes (Packed): plain SGD in async and ssp mode updates from
# the codes in one pass; everything else decodes them. Either way the weights must be bit for
# bit those of pushing the decoded float32 gradients, as servers did before.

BIG_KEY = Key("b", (3000,), 0, 3000)
_ENCODE = {"float16": fp16_encode, "bfloat16": bf16_encode}
_DECODE = {"float16": fp16_decode, "bfloat16": bf16_decode}
OPTIMIZERS = {
    "sgd": OptimizerConfig("sgd", lr=0.01),
    "sgd_wd": OptimizerConfig("sgd", lr=0.01, weight_decay=1e-3),
    "momentum": OptimizerConfig("momentum", lr=0.01, momentum=0.9, nesterov=True),
    "adam": OptimizerConfig("adam", lr=1e-3),
}


def _packed_gradients(fmt, steps, workers):
    """Codes of small and subnormal gradients, -0.0 and the format's extremes; per step."""
    rng = np.random.default_rng(21)
    grads = []
    for _ in range(steps * workers):
        g = (rng.standard_normal(BIG_KEY.size) * 10.0 ** rng.integers(-9, 2, BIG_KEY.size))
        g = g.astype(np.float32)
        g[:4] = [-0.0, 0.0, 6.0e-8, -65504.0]
        grads.append(_ENCODE[fmt](g))
    return grads


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("scale", [1.0, 1024.0, 3.0])
@pytest.mark.parametrize("mode", ["async", "ssp", "sync"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_packed_gradients_give_the_weights_of_their_decoded_values(fmt, scale, mode, optimizer):
    workers, steps = 2, 3
    rng = np.random.default_rng(22)
    first = rng.standard_normal(BIG_KEY.size).astype(np.float32)
    first[:2] = [-0.0, 0.0]
    stores = []
    for _ in range(2):
        store = Store(StoreConfig(mode=mode, workers=workers,
                                  staleness=steps if mode == "ssp" else 0))
        store.init([BIG_KEY], OPTIMIZERS[optimizer], {BIG_KEY.id: first.copy()})
        stores.append(store)
    packed, decoded = stores
    codes = iter(_packed_gradients(fmt, steps, workers))
    for step in range(steps):
        for w in range(workers):
            c = next(codes)
            read = 0 if mode == "sync" else step  # async: some staleness too
            packed.push(w, step, {BIG_KEY.id: (Packed(c, fmt), read)}, scale=scale)
            decoded.push(w, step, {BIG_KEY.id: (_DECODE[fmt](c), read)}, scale=scale)
    got, want = (store.pull(None, 0, None, 1.0)[0] for store in stores)
    assert got[2] == want[2] == steps * (1 if mode == "sync" else workers)  # versions
    np.testing.assert_array_equal(got[1].view(np.uint32), want[1].view(np.uint32))
    assert packed.stats()["staleness_histogram"] == decoded.stats()["staleness_histogram"]


def test_async_plain_sgd_never_makes_a_float32_gradient(monkeypatch):
    # The point of Packed: plain SGD reads the codes, so nothing decodes them.
    def refuse(self):
        raise AssertionError("decoded a gradient that the update could read as codes")

    monkeypatch.setattr(Packed, "decode", refuse)
    store = _store("async", workers=1)
    store.push(0, 0, {W_KEY.id: (Packed(fp16_encode(_grad(0.25)), "float16"), 0)}, scale=2.0)
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 0.125)


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize(("fmt", "bad"), [
    ("float16", 0x7C00), ("float16", 0xFC00), ("float16", 0x7E00), ("float16", 0x7C01),
    ("bfloat16", 0x7F80), ("bfloat16", 0xFF80), ("bfloat16", 0x7FC0), ("bfloat16", 0x7F81),
])
def test_packed_inf_and_nan_codes_are_refused_and_change_nothing(mode, fmt, bad):
    store = _store(mode, workers=1)
    before = store.stats()
    codes = _ENCODE[fmt](_grad(0.25))
    codes[2] = bad
    with pytest.raises(BadRequest, match="inf or NaN"):
        store.push(0, 0, {W_KEY.id: (Packed(codes, fmt), 0)}, scale=4.0)
    _, value, version = store.pull(None, 0, None, 1.0)[0]
    np.testing.assert_array_equal(value, 1.0)
    after = store.stats()
    assert version == 0
    assert (after["pushes"], after["updates"], after["clocks"]) == (
        before["pushes"], before["updates"], before["clocks"])


def test_packed_codes_of_the_wrong_length_are_refused():
    store = _store("async", workers=1)
    with pytest.raises(BadRequest, match=r"expected float16 \(4,\), got float16 \(3,\)"):
        store.push(0, 0, {W_KEY.id: (Packed(np.zeros(3, np.uint16), "float16"), 0)})
    np.testing.assert_array_equal(_value(store), 1.0)
    assert store.stats()["pushes"] == 0


def test_packed_is_refused_unless_uint16_codes_of_a_16_bit_format():
    with pytest.raises(ValueError, match="fmt must be one of float16, bfloat16"):
        Packed(np.zeros(2, np.uint16), "float32")
    with pytest.raises(ValueError, match="codes must be a uint16 array"):
        Packed(np.zeros(2, np.float32), "float16")


def test_a_pull_writes_the_values_where_it_is_told_in_the_format_it_is_told():
    store = _store(mode="async", workers=1, value=1.5)
    float32 = np.zeros(4, np.float32)
    got = store.pull([W_KEY.id], 0, None, 1.0, out={W_KEY.id: float32})
    assert got[0].values is float32 and got[0].version == 0
    np.testing.assert_array_equal(float32, 1.5)
    codes = Packed(np.zeros(4, np.uint16), "float16")
    (pulled,) = store.pull(None, 0, None, 1.0, out={W_KEY.id: codes})
    assert pulled.values is codes
    np.testing.assert_array_equal(codes.codes, np.full(4, 1.5, np.float16).view(np.uint16))


@pytest.mark.parametrize("dest", [np.zeros(3, np.float32), np.zeros(4, np.float64), None])
def test_a_pull_with_a_wrong_destination_is_refused_before_it_waits(dest):
    store = _store(mode="sync", workers=2)
    out = {} if dest is None else {W_KEY.id: dest}
    pulls = store.stats()["pulls"]
    with pytest.raises(BadRequest, match="destination"):
        store.pull([W_KEY.id], 0, 0, 30.0, out=out)  # would wait at the start line
    assert store.stats()["pulls"] == pulls and store.stats()["waiting"] == 0
