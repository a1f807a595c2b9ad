"""The store through faults (no gRPC): dead and silent workers, rejoining, backup workers,
robust aggregation, and snapshots that a restarted server restores."""


import numpy as np
import pytest
from deadline import in_thread

from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.store import Store
from ps.store_config import StoreConfig
from ps.store_errors import BadRequest, LayoutConflict, WaitTimeout

W_KEY = Key("w", (4,), 0, 4)
B_KEY = Key("b", (2,), 0, 2)
SGD = OptimizerConfig("sgd", lr=0.5)
DEADLINE_S = 10.0


class FakeClock:
    """A clock the test moves by hand, so that leases expire exactly when it says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _store(mode="sync", workers=2, optimizer=SGD, clock=None, **kw):
    store = Store(StoreConfig(mode=mode, workers=workers, **kw),
                  **({"clock": clock} if clock else {}))
    store.init([W_KEY, B_KEY], optimizer, {W_KEY.id: np.ones(4, np.float32),
                                           B_KEY.id: np.zeros(2, np.float32)})
    return store


def _grads(x, version=0):
    return {W_KEY.id: (np.full(4, x, np.float32), version),
            B_KEY.id: (np.full(2, x, np.float32), version)}


def _value(store, key=W_KEY):
    return next(v for k, v, _ in store.pull(None, 0, None, 1.0) if k == key)


def _start(store, workers):
    """Every worker passes the start line (pull of step 0), as a run begins."""
    joins = [in_thread(lambda w=w: store.pull(None, w, 0, DEADLINE_S)) for w in workers]
    for join in joins:
        join()


# -- dead and silent workers --------------------------------------------------------------


def test_a_removed_worker_no_longer_holds_the_barrier():
    store = _store("sync", workers=2)
    store.push(0, 0, _grads(2.0))
    with pytest.raises(WaitTimeout):
        store.pull(None, 0, 1, timeout=0.05)
    assert store.remove_worker(1) is True
    # The step is applied with the gradients that came: worker 0's alone.
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 2.0)
    assert store.pull(None, 0, 1, timeout=0.05)  # at once
    assert store.stats()["live_workers"] == [0]
    assert store.remove_worker(1) is False  # already gone


def test_a_removed_worker_waiting_at_the_barrier_is_released_by_the_removal():
    store = _store("sync", workers=3)
    store.push(0, 0, _grads(1.0))
    store.push(1, 0, _grads(1.0))
    waiting = in_thread(lambda: store.pull(None, 0, 1, DEADLINE_S))
    store.remove_worker(2)
    assert waiting()[0][2] == 1  # worker 0 got version 1


def test_a_silent_worker_is_removed_when_its_lease_expires_but_a_waiting_one_is_not():
    clock = FakeClock()
    store = _store("sync", workers=3, clock=clock, lease_s=10.0)
    _start(store, range(3))
    store.push(0, 0, _grads(1.0))
    store.push(1, 0, _grads(3.0))
    waiting = in_thread(lambda: store.pull(None, 0, 1, DEADLINE_S))  # worker 0: in a call
    clock.now = 9.0
    assert store.expire_leases() == []
    clock.now = 11.0
    # Worker 0 waits in a call and worker 1 just pushed... at time 0: only worker 1 and
    # worker 2 have been silent for the whole lease; worker 0's call is in flight.
    assert store.expire_leases() == [1, 2]
    assert waiting()[0][2] == 1
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 2.0)  # both gradients in
    assert store.stats()["live_workers"] == [0]


def test_a_removed_worker_rejoins_and_its_late_gradient_is_dropped_and_counted():
    store = _store("sync", workers=2)
    store.push(0, 0, _grads(2.0))
    store.remove_worker(1)  # step 0 is applied without it
    before = _value(store).copy()
    accepted, _, _ = store.push(1, 0, _grads(100.0))  # its late gradient of step 0
    assert accepted == 2
    np.testing.assert_array_equal(_value(store), before)  # not applied
    assert store.stats()["dropped_gradients"] == 1
    assert store.stats()["live_workers"] == [0, 1]  # live again: step 1 waits for it
    store.push(0, 1, _grads(1.0, version=1))
    with pytest.raises(WaitTimeout):
        store.pull(None, 0, 2, timeout=0.05)
    store.push(1, 1, _grads(3.0, version=1))
    np.testing.assert_array_equal(_value(store), before - 0.5 * 2.0)


def test_a_rejoining_worker_starts_where_the_others_are():
    store = _store("sync", workers=2)
    for step in range(3):
        store.push(0, step, _grads(0.0, version=step))
        store.push(1, step, _grads(0.0, version=step))
    store.remove_worker(1)
    for step in range(3, 5):
        store.push(0, step, _grads(0.0, version=step))
    assert store.start_step(1) == 5  # sync: the steps it missed are done
    assert store.start_step(0) == 5
    async_store = _store("async", workers=2)
    async_store.push(1, 0, _grads(0.0))
    assert async_store.start_step(1) == 1  # async: its own clock
    assert async_store.start_step(0) == 0


def test_ssp_does_not_wait_for_a_removed_worker():
    store = _store("ssp", workers=2, staleness=1)
    _start(store, range(2))
    store.push(0, 0, _grads(0.0))
    store.push(0, 1, _grads(0.0, version=1))
    with pytest.raises(WaitTimeout):
        store.pull(None, 0, 2, timeout=0.05)  # 2 steps ahead of worker 1's clock 0
    store.remove_worker(1)
    assert store.pull(None, 0, 2, timeout=0.05)


def test_removing_an_unknown_worker_is_refused():
    store = _store("sync", workers=2)
    with pytest.raises(BadRequest, match="worker 5 is out of range"):
        store.remove_worker(5)
    assert store.stats()["live_workers"] == [0, 1]


# -- backup workers and robust aggregation ------------------------------------------------


def test_backup_workers_take_the_first_w_minus_b_gradients_and_drop_the_rest():
    store = _store("sync", workers=3, backup_workers=1)
    store.push(2, 0, _grads(1.0))
    store.push(0, 0, _grads(3.0))  # two of three: the step is complete
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 2.0)
    store.push(1, 0, _grads(-50.0))  # the straggler's gradient comes too late
    np.testing.assert_array_equal(_value(store), 1.0 - 0.5 * 2.0)
    assert store.stats()["dropped_gradients"] == 1
    assert store.pull(None, 1, 1, timeout=0.05)  # and it goes on with the next step


@pytest.mark.parametrize("rule, expected", [
    ("mean", (1.0 + 2.0 - 100.0 + 6.0 + 10.0) / 5),
    ("median", 2.0),
    ("trimmed_mean:0.2", (1.0 + 2.0 + 6.0) / 3),  # -100 and 10 cut off
])
def test_sync_aggregation_rules(rule, expected):
    store = _store("sync", workers=5, aggregate=rule)
    for w, g in enumerate([1.0, 2.0, -100.0, 6.0, 10.0]):  # worker 2 is Byzantine
        store.push(w, 0, _grads(g))
    np.testing.assert_allclose(_value(store), 1.0 - 0.5 * expected, rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    ({"workers": 2, "backup_workers": 2}, "backup_workers must be in 0..1"),
    ({"mode": "async", "workers": 2, "backup_workers": 1},
     r"backup_workers \(1\) is for --mode sync"),
    ({"mode": "ssp", "aggregate": "median"}, "is for --mode sync"),
    ({"aggregate": "trimmed_mean:0.5"}, r"must be in \[0, 0.5\)"),
    ({"aggregate": "trimmed_mean"}, "needs a fraction"),
    ({"aggregate": "mode"}, "aggregate must be one of"),
    ({"lease_s": 0.0}, "lease_s must be > 0"),
])
def test_bad_fault_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        StoreConfig(**settings)


# -- snapshots and restores ----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [OptimizerConfig("momentum", lr=0.1),
                                       OptimizerConfig("adam", lr=0.01)])
def test_a_restored_store_continues_exactly_as_the_original(optimizer):
    rng = np.random.default_rng(0)
    steps = [[{k: (rng.standard_normal(n).astype(np.float32), s) for k, n in
               ((W_KEY.id, 4), (B_KEY.id, 2))} for _ in range(2)] for s in range(6)]
    original = _store("sync", workers=2, optimizer=optimizer)
    for s in range(3):
        for w in range(2):
            original.push(w, s, steps[s][w])
    restored = Store(StoreConfig(mode="sync", workers=2))
    restored.restore(original.snapshot())
    for store in (original, restored):
        for s in range(3, 6):
            for w in range(2):
                store.push(w, s, steps[s][w])
    for key in (W_KEY, B_KEY):
        np.testing.assert_array_equal(_value(restored, key), _value(original, key))
    assert restored.stats()["updates"] == original.stats()["updates"]
    assert restored.stats()["restored_from"] == 3


def test_a_sync_snapshot_leaves_out_a_step_still_gathering():
    store = _store("sync", workers=2)
    store.push(0, 0, _grads(1.0))  # step 0 is half in
    snapshot = store.snapshot()
    assert snapshot.seq == 0
    assert all(k.clocks.tolist() == [0, 0] for k in snapshot.keys)  # both push step 0 again
    restored = Store(StoreConfig(mode="sync", workers=2))
    restored.restore(snapshot)
    restored.push(0, 0, _grads(1.0))
    restored.push(1, 0, _grads(3.0))
    np.testing.assert_array_equal(_value(restored), 1.0 - 0.5 * 2.0)


def test_workers_further_on_than_a_restored_store_rejoin_and_it_catches_up():
    store = _store("sync", workers=2)
    snapshot = store.snapshot()  # at version 0
    restored = Store(StoreConfig(mode="sync", workers=2))
    restored.restore(snapshot)
    # The workers had got to step 7 on the other servers when this one came back.
    restored.push(0, 7, _grads(1.0, version=7))  # versions they read are ahead: accepted
    with pytest.raises(WaitTimeout):
        restored.pull(None, 0, 8, timeout=0.05)
    restored.push(1, 7, _grads(3.0, version=7))
    got = restored.pull(None, 0, 8, timeout=0.05)
    assert {version for _, _, version in got} == {8}
    np.testing.assert_array_equal(_value(restored), 1.0 - 0.5 * 2.0)


def test_a_worker_whose_step_went_to_the_server_before_its_restart_is_not_waited_for():
    # Worker 1 had step 7 applied by this server's former self and moved on to step 8;
    # worker 0's step 7 never made it. The restored store hears worker 1 first, at step 8.
    store = _store("sync", workers=2)
    restored = Store(StoreConfig(mode="sync", workers=2))
    restored.restore(store.snapshot())
    restored.push(1, 8, _grads(3.0, version=8))
    restored.push(0, 7, _grads(1.0, version=7))
    # Worker 1's step 7 will not come again: step 7 is applied with worker 0's alone.
    assert {v for _, _, v in restored.pull(None, 0, 8, timeout=1.0)} == {8}
    np.testing.assert_array_equal(_value(restored), 1.0 - 0.5 * 1.0)
    restored.push(0, 8, _grads(1.0, version=8))  # and step 8 waits for both, as always
    assert {v for _, _, v in restored.pull(None, 1, 9, timeout=1.0)} == {9}
    np.testing.assert_array_equal(_value(restored), 1.0 - 0.5 * 1.0 - 0.5 * 2.0)


def test_restore_refuses_a_store_in_use_and_a_checkpoint_of_another_run():
    store = _store("sync", workers=2)
    snapshot = store.snapshot()
    with pytest.raises(LayoutConflict, match="already holds parameters"):
        store.restore(snapshot)
    other = Store(StoreConfig(mode="async", workers=2))
    with pytest.raises(BadRequest, match="checkpoint is of a sync run with 2 workers"):
        other.restore(snapshot)
    assert other.layout() == ()  # nothing changed
