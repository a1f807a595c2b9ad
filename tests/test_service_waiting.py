"""No client can starve a server: each worker id holds at most max_waiting calls that may wait
(more are refused at once with RESOURCE_EXHAUSTED, over gRPC and the local channel alike), the
handler pool leaves threads for pushes and control calls, and a barrier opens when its workers
arrive."""

import grpc
import numpy as np
import pytest
from deadline import in_thread, wait_until
from grpc_health.v1 import health_pb2

from ps import ps_pb2
from ps.client import PSClient
from ps.codec import encode_push_request
from ps.keys import Key
from ps.local import LocalContext, LocalError
from ps.optimizer import OptimizerConfig
from ps.server import ServerConfig, serve
from ps.service import ParameterServerServicer, local_handlers
from ps.store import Store
from ps.store_config import StoreConfig
from ps.store_errors import ResourceExhausted

PARAMS = {"dense0.weight": np.ones((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}
BOUND = StoreConfig().max_waiting  # 32
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _pull(worker, step=0) -> bytes:
    return ps_pb2.PullRequest(worker=worker, step=step).SerializeToString()


def _push_pull(worker, step=0) -> bytes:
    items = [(name, 0, np.full(v.size, 0.5, np.float32), 0) for name, v in PARAMS.items()]
    return encode_push_request(worker, step, items)


def _serve(**settings):
    running = serve(**settings)
    with PSClient([running.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    return running


def _hold(running, channel, method, payloads, waiting):
    """Send every payload at once (futures, no threads of ours); once `waiting` calls wait in
    the store, return (the calls still waiting, the ones answered)."""
    call = channel.unary_unary(f"/tinyps.ParameterServer/{method}")
    futures = [call.future(p, timeout=30) for p in payloads]
    answered = len(payloads) - waiting
    wait_until(lambda: running.store.stats()["waiting"] == waiting
               and sum(f.done() for f in futures) == answered,
               f"{waiting} calls waiting and {answered} answered")
    return [f for f in futures if not f.done()], [f for f in futures if f.done()]


def _control_calls_answer(channel, workers):
    """Stats, Version, Layout and the health check answer within 5 s."""
    def call(method, request, reply):
        return channel.unary_unary(method, request_serializer=type(request).SerializeToString,
                                   response_deserializer=reply.FromString)(request, timeout=5)

    call("/tinyps.ParameterServer/Version", ps_pb2.VersionRequest(worker=0), ps_pb2.VersionReply)
    call("/tinyps.ParameterServer/Layout", ps_pb2.LayoutRequest(), ps_pb2.LayoutReply)
    call("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(),
         health_pb2.HealthCheckResponse)
    stats = call("/tinyps.ParameterServer/Stats", ps_pb2.StatsRequest(), ps_pb2.StatsReply)
    assert stats.workers == workers


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_forty_waiting_pulls_of_worker_0_leave_stats_and_the_barrier_free(mode):
    # The issue's: a raw client holds 40 sync pulls of worker 0, step 0, W=2. 32 wait, 8 are
    # refused at once naming the worker and the bound; Stats answers; worker 1's pull opens
    # the start line, and every waiting pull is answered.
    running = _serve(mode=mode, workers=2, staleness=1 if mode == "ssp" else 0)
    try:
        with grpc.insecure_channel(running.address) as channel:
            waiting, refused = _hold(running, channel, "Pull", [_pull(0)] * 40, BOUND)
            assert len(refused) == 8
            for f in refused:
                assert f.code() == EXHAUSTED
                assert f"worker 0 already has {BOUND} calls that may wait on this server, " \
                       f"the most one worker may (max_waiting {BOUND})" in f.details()
            _control_calls_answer(channel, 2)
            channel.unary_unary("/tinyps.ParameterServer/Pull")(_pull(1), timeout=10)
            for f in waiting:
                f.result(timeout=10)
    finally:
        running.stop(0)


def test_forty_waiting_push_pulls_leave_the_barrier_free_and_apply_once():
    running = _serve(mode="sync", workers=2)
    try:
        with grpc.insecure_channel(running.address) as channel:
            for w in (0, 1):  # the start line
                in_thread(lambda w=w: channel.unary_unary("/tinyps.ParameterServer/Pull")(
                    _pull(w), timeout=10))
            wait_until(lambda: running.store.stats()["pulls"] == 2, "both workers started")
            waiting, refused = _hold(running, channel, "PushPull", [_push_pull(0)] * 40, BOUND)
            assert len(refused) == 8 and all(f.code() == EXHAUSTED for f in refused)
            _control_calls_answer(channel, 2)
            channel.unary_unary("/tinyps.ParameterServer/PushPull")(_push_pull(1), timeout=10)
            for f in waiting:
                f.result(timeout=10)
        # One step applied: the mean 0.5 times lr 0.5, once.
        np.testing.assert_array_equal(running.store.pull(None, 0, None, 1.0)[1].values, -0.25)
        assert running.store.stats()["updates"] == 2  # one per key
    finally:
        running.stop(0)


def test_three_worker_ids_held_full_leave_the_fourth_its_barrier():
    running = _serve(mode="sync", workers=4)
    try:
        with grpc.insecure_channel(running.address) as channel:
            payloads = [_pull(w) for w in (0, 1, 2) for _ in range(BOUND + 5)]
            waiting, refused = _hold(running, channel, "Pull", payloads, 3 * BOUND)
            assert len(refused) == 15 and all(f.code() == EXHAUSTED for f in refused)
            _control_calls_answer(channel, 4)
            channel.unary_unary("/tinyps.ParameterServer/Pull")(_pull(3), timeout=10)
            for f in waiting:
                f.result(timeout=10)
    finally:
        running.stop(0)


@pytest.mark.parametrize("worker", [2, 9, -1, 2**31 - 1])
def test_pulls_of_a_worker_out_of_range_are_refused_at_once(worker):
    running = _serve(mode="sync", workers=2)
    try:
        with grpc.insecure_channel(running.address) as channel:
            _, refused = _hold(running, channel, "Pull", [_pull(worker)] * 50, 0)
            assert {f.code() for f in refused} == {grpc.StatusCode.INVALID_ARGUMENT}
            assert f"worker {worker} is out of range" in refused[0].details()
            _control_calls_answer(channel, 2)
    finally:
        running.stop(0)


def test_the_bound_holds_on_the_local_channel_too():
    # The local channel (ps/local.py) calls the same servicer methods on threads of its own:
    # the places are the store's, so the bound is the same.
    store = Store(StoreConfig(mode="sync", workers=2, max_waiting=3))
    key = Key("w", (2,), 0, 2)
    store.init([key], OptimizerConfig("sgd", lr=0.5), {key.id: np.ones(2, np.float32)})
    pull = local_handlers(ParameterServerServicer(store, lambda: None))["Pull"]
    joins = [in_thread(lambda: pull(_pull(0), LocalContext(20))) for _ in range(3)]
    wait_until(lambda: store.stats()["waiting"] == 3, "three pulls waiting")
    with pytest.raises(LocalError) as err:
        pull(_pull(0), LocalContext(20))
    assert err.value.code == EXHAUSTED and "max_waiting 3" in err.value.details
    pull(_pull(1), LocalContext(20))  # worker 1 arrives: the start line opens
    for join in joins:
        join()
    pull(_pull(0), LocalContext(20))  # the places are free again


def test_a_store_frees_a_place_when_its_call_ends_however_it_ends():
    store = Store(StoreConfig(mode="sync", workers=2, max_waiting=1))
    key = Key("w", (2,), 0, 2)
    store.init([key], OptimizerConfig("sgd", lr=0.5), {key.id: np.ones(2, np.float32)})
    for _ in range(3):  # each times out, and gives its place back
        with pytest.raises(Exception, match="still waiting"):
            store.pull(None, 0, 0, 0.05)
    join = in_thread(lambda: store.pull(None, 0, 0, 20))
    wait_until(lambda: store.stats()["waiting"] == 1, "one pull waiting")
    with pytest.raises(ResourceExhausted, match="worker 0 already has 1 calls"):
        store.pull(None, 0, 0, 20)
    store.pull(None, 1, 0, 20)
    join()


def test_a_pool_too_small_for_the_waiting_calls_is_refused():
    with pytest.raises(ValueError, match="threads 64 leaves no thread for pushes and control "
                                         "calls when the 2 workers hold their 32 waiting"):
        ServerConfig(threads=64, store=StoreConfig(workers=2))
    assert ServerConfig(threads=65, store=StoreConfig(workers=2)).threads == 65
