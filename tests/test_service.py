"""The gRPC service end to end: status codes for bad requests, health and reflection for
stock clients, large tensors in chunks, and the committed generated code."""

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ps import ps_pb2, ps_pb2_grpc
from ps.client import PSClient, PSError
from ps.codec import write_slice
from ps.server import SERVICE_NAME, serve

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"dense0.weight": np.ones((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


@pytest.fixture
def server():
    running = serve(mode="async", workers=2)
    yield running
    running.stop(0)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield ps_pb2_grpc.ParameterServerStub(channel)


@pytest.fixture
def initialised(server):
    with PSClient([server.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    return server


def _push(name="dense0.bias", values=None, step=0, worker=0, **slice_fields):
    values = np.ones(2, np.float32) if values is None else values
    piece = write_slice(ps_pb2.Slice(), name, 0, values)
    for field, value in slice_fields.items():
        if field == "shape":
            del piece.shape[:]
            piece.shape.extend(value)
        else:
            setattr(piece, field, value)
    return ps_pb2.PushRequest(worker=worker, step=step, grads=[piece])


def _code(call, request):
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (_push(values=np.ones(3, np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
         "expected float32 (2,)"),
        (_push(dtype="float64"), grpc.StatusCode.INVALID_ARGUMENT, "dtype 'float64'"),
        (_push(data=b"\x00" * 7), grpc.StatusCode.INVALID_ARGUMENT, "needs 8 bytes, got 7"),
        (_push(shape=[-2]), grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
        (_push(values=np.array([1, np.inf], np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
         "inf or NaN"),
        (_push(dtype="float16", data=np.array([0x3C00, 0x7C00], "<u2").tobytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "inf or NaN"),
        (_push(dtype="bfloat16", data=np.array([0x7FC0, 0x3F80], "<u2").tobytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "inf or NaN"),
        (_push(dtype="float16", shape=[3], data=b"\x00" * 6), grpc.StatusCode.INVALID_ARGUMENT,
         "expected float16 (2,)"),
        (_push(name="dense9.bias"), grpc.StatusCode.NOT_FOUND, "no tensor 'dense9.bias'"),
        (_push(step=5), grpc.StatusCode.OUT_OF_RANGE, "beyond worker 0's next step 0"),
        (_push(step=-1), grpc.StatusCode.OUT_OF_RANGE, "step must be >= 0"),
        (_push(worker=7), grpc.StatusCode.INVALID_ARGUMENT, "worker 7 is out of range"),
    ],
)
def test_bad_pushes_get_their_status_and_change_nothing(initialised, stub, request_, code, words):
    got_code, details = _code(stub.Push, request_)
    assert got_code == code
    assert words in details
    with PSClient([initialised.address]) as client:
        np.testing.assert_array_equal(client.pull()["dense0.bias"], 0.0)
        assert client.stats()[0]["pushes"] == 0
        assert client.versions()[0]["clocks"] == {0: 0, 1: 0}


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_a_16_bit_push_applies_the_decoded_gradient(initialised, wire_dtype):
    # 3 and 2**-18 are exact in both formats (2**-18 a subnormal half), as are the results:
    # divided by the scale 4, times lr 0.5.
    grad = np.array([3.0, 2.0**-18], np.float32)
    with PSClient([initialised.address], wire_dtype=wire_dtype) as client:
        client.pull()
        client.push({"dense0.weight": np.zeros((3, 2), np.float32), "dense0.bias": grad}, 0,
                     scale=4.0)
        np.testing.assert_array_equal(client.pull()["dense0.bias"],
                                      np.array([-0.375, -2.0**-21], np.float32))


def test_push_before_init_is_a_failed_precondition(stub):
    code, details = _code(stub.Push, _push())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not initialised" in details


def test_pull_of_an_unknown_tensor_is_not_found(initialised, stub):
    code, details = _code(stub.Pull, ps_pb2.PullRequest(keys=[ps_pb2.KeyRef(name="x")], step=-1))
    assert code == grpc.StatusCode.NOT_FOUND and "'x'" in details


def test_a_second_init_with_other_shapes_is_refused(initialised):
    with PSClient([initialised.address]) as client:
        with pytest.raises(PSError, match="FAILED_PRECONDITION.*another layout"):
            client.init({"dense0.weight": np.ones((4, 2), np.float32),
                          "dense0.bias": np.zeros(2, np.float32)}, "sgd", lr=0.5)
        client.init(PARAMS, "sgd", lr=0.5)  # the same layout again: accepted
        np.testing.assert_array_equal(client.pull()["dense0.weight"], 1.0)


def test_client_refuses_bad_gradients_before_sending(initialised):
    with PSClient([initialised.address]) as client:
        client.pull()
        with pytest.raises(ValueError, match="missing"):
            client.push({"dense0.weight": np.ones((3, 2), np.float32)}, 0)
        with pytest.raises(ValueError, match=r"must be float32 \(2,\)"):
            client.push({"dense0.weight": np.ones((3, 2), np.float32),
                         "dense0.bias": np.ones(3, np.float32)}, 0)


def test_a_replayed_push_is_applied_once(initialised, stub):
    request = _push()
    assert stub.Push(request, timeout=10).accepted == 1
    for _ in range(3):
        reply = stub.Push(request, timeout=10)
        assert (reply.accepted, reply.duplicates) == (0, 1)
    with PSClient([initialised.address]) as client:
        np.testing.assert_array_equal(client.pull()["dense0.bias"], -0.5)


def test_health_answers_a_plain_grpc_client(server):
    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", SERVICE_NAME):
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_to_a_plain_grpc_client(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_a_256_mib_tensor_pulls_and_pushes(server):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((8192, 8192), dtype=np.float32)  # 256 MiB
    with PSClient([server.address], deadline_s=120) as client:
        client.init({"big": big}, "sgd", lr=1.0)
        pulled = client.pull()["big"]
        np.testing.assert_array_equal(pulled, big)
        del pulled
        grad = np.full(big.shape, 0.5, np.float32)
        assert client.push({"big": grad}, 0).accepted == 64  # 64 keys of 4 MiB
        del grad
        big -= np.float32(0.5)
        np.testing.assert_array_equal(client.pull()["big"], big)


def test_generated_code_is_fresh(tmp_path):
    """ps_pb2*.py must be what `make proto` makes from proto/ps.proto today."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-Ips={ROOT / 'proto'}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         str(ROOT / "proto" / "ps.proto")],
        check=True, timeout=60,
    )
    for name in ("ps_pb2.py", "ps_pb2_grpc.py", "ps_pb2.pyi"):
        fresh = (tmp_path / "ps" / name).read_text()
        assert fresh == (ROOT / "ps" / name).read_text(), f"ps/{name} is stale: run make proto"


@pytest.mark.parametrize("shared_memory", [False, True])
@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_the_servicer_writes_its_replies_with_the_stores_lock_released(monkeypatch,
                                                                      shared_memory,
                                                                      wire_dtype):
    """The store writes the values where the servicer tells it; the reply is made after."""
    import ps.service

    running = serve(mode="sync", workers=1)
    held = []

    def watch(owner, name):  # the servicer's writers of a reply, with who holds the lock
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            held.append(running.store._cond._is_owned())  # threading.Condition's own check
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    watch(ps.service, "write_pull_reply")  # replies that say where the mailbox holds values
    watch(ps.service.ReplyPlan, "finish")  # replies with the values in them
    try:
        with PSClient([running.address], shared_memory=shared_memory,
                      wire_dtype=wire_dtype) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            grads = {name: np.full(v.shape, 0.25, np.float32) for name, v in PARAMS.items()}
            client.push(grads, 0)
            after = client.pull(1)
            fused = client.push_pull(grads, 1)
    finally:
        running.stop(0)
    assert held and not any(held), held
    np.testing.assert_array_equal(after["dense0.weight"], PARAMS["dense0.weight"] - 0.125)
    np.testing.assert_array_equal(fused.params["dense0.bias"], -0.25)


def test_a_reply_laid_out_for_other_versions_is_written_again_and_right(monkeypatch):
    """The reply is laid out for the keys' versions before the pull; when they turn out to
    need another number of bytes, the servicer writes it again from the values."""
    import ps.service

    running = serve(mode="async", workers=1)
    again = []
    write = ps.service.write_pull_reply
    monkeypatch.setattr(ps.service, "write_pull_reply",
                        lambda *a, **k: again.append(1) or write(*a, **k))
    try:
        with PSClient([running.address], shared_memory=False) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            assert client.pull()["dense0.bias"].tolist() == [0.0, 0.0] and not again
            monkeypatch.setattr(running.store, "key_versions",
                                lambda key_ids: [300] * len(key_ids or running.store.layout()))
            client.push({name: np.full(v.shape, 2.0, np.float32)
                         for name, v in PARAMS.items()}, 0)
            assert client.pull()["dense0.bias"].tolist() == [-1.0, -1.0]
            assert again  # laid out for version 300 (2 bytes), answered at version 1
    finally:
        running.stop(0)


# ---------------------------------------------------------------------------------------------
# Weights stay finite: a bad loss scale or an update that would overflow is refused (async) or
# skips its step (sync), over gRPC, Push and PushPull alike.


@pytest.mark.parametrize("method", ["Push", "PushPull"])
@pytest.mark.parametrize("scale", [1e-300, 1e-40, 2.0**70])
def test_a_grad_scale_out_of_bounds_is_invalid_argument(initialised, stub, method, scale):
    request = _push(values=np.ones(2, np.float32))
    request.grad_scale = scale
    code, details = _code(getattr(stub, method), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"grad_scale {scale:g} is outside [2**-24, 2**64]" in details
    with PSClient([initialised.address]) as client:
        np.testing.assert_array_equal(client.pull()["dense0.bias"], 0.0)
        assert client.versions()[0]["clocks"] == {0: 0, 1: 0}


@pytest.mark.parametrize("method", ["Push", "PushPull"])
def test_a_push_that_would_overflow_the_weights_is_refused_and_may_be_retried(initialised,
                                                                                 stub, method):
    # lr 0.5, gradient 3.4e38: the bias goes to -1.7e38, -3.4e38, then the third would pass
    # float32's largest. That push is refused, naming the key; its step is sent again, with an
    # ordinary gradient, and taken.
    call = getattr(stub, method)
    with PSClient([initialised.address]) as client:
        for step in range(2):
            call(_push(values=np.full(2, 3.4e38, np.float32), step=step, version=step),
                 timeout=10)
        before = client.pull()["dense0.bias"]
        code, details = _code(call, _push(values=np.full(2, 3.4e38, np.float32), step=2,
                                          version=2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("push dense0.bias[0:2]: the update would make weights "
                                  "non-finite: sgd with lr 0.5")
        np.testing.assert_array_equal(client.pull()["dense0.bias"], before)
        call(_push(values=np.ones(2, np.float32), step=2, version=2), timeout=10)
        assert np.isfinite(client.pull()["dense0.bias"]).all()
        assert initialised.store.key_versions([("dense0.bias", 0)]) == [3]
        assert client.stats()[0]["rejected_pushes"] == 1


def test_sync_a_step_that_would_overflow_is_skipped_and_push_pull_says_so():
    running = serve(mode="sync", workers=1)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            client.pull(step=0)
            huge = {name: np.full(v.shape, 3.4e38, np.float32) for name, v in PARAMS.items()}
            for step in range(2):
                result = client.push_pull(huge, step)
                assert not result.step_skipped
            result = client.push_pull(huge, 2)  # past float32: skipped, weights kept
            assert result.step_skipped
            assert all(np.isfinite(v).all() for v in result.params.values())
            assert client.stats()[0]["skipped_steps"] == 1
            result = client.push_pull({n: np.ones(v.shape, np.float32)
                                       for n, v in PARAMS.items()}, 3)
            assert not result.step_skipped
    finally:
        running.stop(0)


# ---------------------------------------------------------------------------------------------
# Init is checked whole before anything is allocated or kept.


@pytest.mark.parametrize("optimizer, size, code, words", [
    ("adam", 2**33, grpc.StatusCode.RESOURCE_EXHAUSTED, "init: the layout needs 103079216128 "
                                                         "bytes"),
    ("sgd", 2**40, grpc.StatusCode.RESOURCE_EXHAUSTED, "more than this server's memory budget"),
])
def test_a_huge_init_is_resource_exhausted_and_keeps_no_layout(server, stub, optimizer, size,
                                                                code, words):
    request = ps_pb2.InitRequest(
        optimizer=ps_pb2.OptimizerSettings(name=optimizer, lr=0.1, beta1=0.9, beta2=0.999,
                                           eps=1e-8),
        keys=[ps_pb2.KeySpec(name="w", tensor_shape=[size], start=0, stop=size)])
    got, details = _code(stub.Init, request)
    assert got == code and words in details
    with PSClient([server.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)  # the server holds no layout: a good init works
        np.testing.assert_array_equal(client.pull()["dense0.weight"], 1.0)


def test_overlapping_keys_and_two_shapes_are_invalid_argument(server, stub):
    spec = ps_pb2.KeySpec
    for keys, words in [
        ([spec(name="w", tensor_shape=[10], start=0, stop=6),
          spec(name="w", tensor_shape=[10], start=4, stop=10)], "keys w[0:6] and w[4:10] overlap"),
        ([spec(name="w", tensor_shape=[10], start=0, stop=5),
          spec(name="w", tensor_shape=[5, 2], start=5, stop=10)], "give tensor 'w' two shapes"),
        ([spec(name="w", tensor_shape=[10], start=3, stop=12)], "w[3:12] is not a non-empty range"),
    ]:
        got, details = _code(stub.Init, ps_pb2.InitRequest(
            optimizer=ps_pb2.OptimizerSettings(name="sgd", lr=0.1, beta1=0.9, beta2=0.999,
                                               eps=1e-8), keys=keys))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and words in details
    assert server.store.layout() == ()
