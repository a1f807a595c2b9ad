"""Blocked time: servers measure how long they held a pull at a barrier or the staleness bound,
and say so in PullReply.blocked_s over both transports; a worker's wait splits into blocked
and wire time. Every wait here is made by an event (a push that opens a barrier), never by a
sleep, and no test asserts a wall-clock duration."""

import numpy as np
import pytest
from cluster import end_process, run_worker_processes, spawn_server
from deadline import in_thread, wait_until

from ps.client import PSClient
from ps.codec import ReplyPlan, decode_pull_reply, encode_pull_reply
from ps.keys import Key
from ps.memory import filled_bytes
from ps.optimizer import OptimizerConfig
from ps.server import serve
from ps.store import Store
from ps.store_config import StoreConfig

W_KEY = Key("w", (4,), 0, 4)
PARAMS = {"w": np.zeros(4, np.float32)}
GRAD = {"w": np.full(4, 0.5, np.float32)}


def _store(mode: str, workers: int = 2, **settings) -> Store:
    store = Store(StoreConfig(mode=mode, workers=workers, **settings))
    store.init([W_KEY], OptimizerConfig("sgd", lr=0.5), {W_KEY.id: np.zeros(4, np.float32)})
    return store


def _waiting(store: Store, n: int) -> None:
    wait_until(lambda: store.stats()["waiting"] == n, f"{n} pulls waiting in the store")


def _start(store: Store, workers: int = 2) -> None:
    """Every worker past the start line (its own wait, measured apart)."""
    joins = [in_thread(lambda w=w: store.pull(None, w, 0, 30.0)) for w in range(workers)]
    for join in joins:
        join()


# -- the store ------------------------------------------------------------------------------


def test_a_sync_pull_released_by_the_other_workers_push_reports_blocked_time():
    store = _store("sync")
    _start(store)
    store.push(1, 0, {W_KEY.id: (np.ones(4, np.float32), 0)})
    waiting = in_thread(lambda: store.pull(None, 1, 1, 30.0))  # worker 1 waits for worker 0
    _waiting(store, 1)
    store.push(0, 0, {W_KEY.id: (np.ones(4, np.float32), 0)})  # opens the barrier
    answer = waiting()
    assert answer.blocked_s > 0.0 and answer[0].version == 1
    # Worker 0 finds the barrier open: it was not held at all.
    assert store.pull(None, 0, 1, 30.0).blocked_s == 0.0


def test_pulls_that_do_not_wait_report_exactly_zero():
    store = _store("async")
    _start(store)
    assert store.pull(None, 0, None, 1.0).blocked_s == 0.0  # a look: no step
    for step in range(3):  # async never waits beyond the start line
        store.push(0, step, {W_KEY.id: (np.ones(4, np.float32), step)})
        assert store.pull(None, 0, step + 1, 1.0).blocked_s == 0.0
    ssp = _store("ssp", staleness=1)
    _start(ssp)
    ssp.push(0, 0, {W_KEY.id: (np.ones(4, np.float32), 0)})
    assert ssp.pull(None, 0, 1, 1.0).blocked_s == 0.0  # within the bound: answered at once


def test_an_ssp_pull_held_at_the_bound_reports_blocked_time():
    store = _store("ssp", staleness=1)
    _start(store)
    for step in range(2):
        store.push(0, step, {W_KEY.id: (np.ones(4, np.float32), step)})
    waiting = in_thread(lambda: store.pull(None, 0, 2, 30.0))  # 2 - 0 > K: held
    _waiting(store, 1)
    store.push(1, 0, {W_KEY.id: (np.ones(4, np.float32), 0)})  # the slowest moves up
    assert waiting().blocked_s > 0.0


# -- the wire -------------------------------------------------------------------------------


def test_blocked_s_travels_as_protobuf_writes_it_and_a_planned_reply_has_room_for_it():
    from ps import ps_pb2

    values = np.arange(4, dtype=np.float32)
    ours = encode_pull_reply([("w", 0, values, 3)], blocked_s=0.25)
    theirs = ps_pb2.PullReply.FromString(ours)
    assert theirs.blocked_s == 0.25 and decode_pull_reply(ours).blocked_s == 0.25
    reply = ps_pb2.PullReply(blocked_s=0.25)
    reply.values.add(name="w", dtype="float32", shape=[4], data=values.tobytes(), version=3)
    assert ours == reply.SerializeToString()
    assert decode_pull_reply(encode_pull_reply([("w", 0, values, 3)])).blocked_s == 0.0
    for blocked in (0.0, 1.5):  # laid out before the wait: room for it either way
        plan = ReplyPlan([W_KEY], "float32", [3], may_wait=True)

        def fill(dest, blocked=blocked, plan=plan):
            plan.destinations(dest)[W_KEY.id][:] = values
            assert plan.finish(dest, [3], False, blocked)

        parsed = ps_pb2.PullReply.FromString(filled_bytes(plan.size, fill))
        assert parsed.blocked_s == blocked and parsed.values[0].data == values.tobytes()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "local"])
@pytest.mark.parametrize("fused", [False, True], ids=["pull", "push_pull"])
def test_the_worker_released_by_a_push_hears_it_was_blocked_over_each_transport(
        shared_memory, fused):
    running = serve(mode="sync", workers=2)
    try:
        with PSClient([running.address], 0, shared_memory=shared_memory) as fast, \
                PSClient([running.address], 1, shared_memory=shared_memory) as slow:
            fast.init(PARAMS, "sgd", lr=0.5)
            other = in_thread(lambda: slow.pull(0))
            fast.pull(0)
            other()
            if shared_memory:  # the tensor calls did go through the local channel
                assert all(link.channel is not None for link in fast.links)
            if fused:
                waiting = in_thread(lambda: fast.push_pull(GRAD, 0))
            else:
                fast.push(GRAD, 0)
                waiting = in_thread(lambda: (fast.pull(1), fast.last_blocked_s))
            _waiting(running.store, 1)
            if fused:
                released = slow.push_pull(GRAD, 0)
                assert released.blocked_s == 0.0 and slow.last_blocked_s == 0.0
                assert waiting().blocked_s > 0.0 and fast.last_blocked_s > 0.0
            else:
                slow.push(GRAD, 0)
                slow.pull(1)
                assert slow.last_blocked_s == 0.0
                params, blocked = waiting()
                assert blocked > 0.0 and params["w"].tolist() == [-0.25] * 4
    finally:
        running.stop(0)


# -- workers: a straggler in sync holds the fast worker back; in async it cannot ----------------


def _blocked_share(mode: str) -> tuple[float, list[dict]]:
    proc, address = spawn_server(mode=mode, workers=2)
    try:
        specs = [{"dataset": "digits", "seed": 0, "workers": 2, "worker": w,
                  "addresses": [address], "hidden": (32,), "lr": 0.05,
                  "config": {"steps": 40, "batch_size": 32, "seed": 0,
                             "delay_s": 0.02 if w == 1 else 0.0}}
                 for w in range(2)]
        records = run_worker_processes(specs)
    finally:
        end_process(proc)
    fast = records[0][1:]  # step 0 left out: the start line, which is startup skew
    spent = sum(r["compute_s"] + r["wait_s"] for r in fast)
    for r in fast:
        assert r["wait_s"] == pytest.approx(r["blocked_s"] + r["wire_s"])
        assert 0.0 <= r["blocked_s"] <= r["wait_s"]
    return sum(r["blocked_s"] for r in fast) / spent, fast


@pytest.mark.slow
def test_a_straggler_blocks_the_fast_worker_in_sync_and_never_in_async():
    sync_share, _ = _blocked_share("sync")
    async_share, fast = _blocked_share("async")
    # async answers every pull beyond the start line at once: no blocked time at all.
    assert async_share == 0.0 and all(r["blocked_s"] == 0.0 for r in fast)
    # sync: the fast worker waits out the straggler's extra 20 ms on most steps.
    assert sync_share > 0.3
