"""The store on its own (no gRPC): consistency modes, step rules, refusals that change nothing."""

import threading

import numpy as np
import pytest

from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.store import (
    BadRequest,
    LayoutConflict,
    NotInitialised,
    StepOutOfRange,
    Store,
    StoreConfig,
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
    return store.pull(None, 0, -1, 1.0)[0][1]


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
        store.pull(None, 0, -1, 1.0)


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
