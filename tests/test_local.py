"""Local channels (ps/local.py): a worker on the server's host calls Pull, Push and PushPull over
a Unix socket instead of gRPC. The same numbers and the same errors as through gRPC, a key that
only Attach gives out, frames that are checked, deadlines kept, and gRPC again when the server
stops, restarts or serves TLS."""

import socket
import sys
import threading

import grpc
import numpy as np
import pytest

from ps import ps_pb2
from ps.client import PSClient, PSError
from ps.codec import encode_push_request
from ps.local import LocalChannel, LocalError, LocalServer, LocalUnavailable
from ps.server import serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="local channels need Linux's abstract Unix sockets")

PARAMS = {"a": np.linspace(-1, 1, 600, dtype=np.float32).reshape(200, 3),
          "b": np.linspace(0, 1, 5, dtype=np.float32)}


def _train(address: str, shared: bool) -> dict[str, np.ndarray]:
    """One async worker: pushes, pulls and PushPulls; the weights it ends with."""
    with PSClient([address], shared_memory=shared) as client:
        client.init(PARAMS, "momentum", lr=0.1, split_bytes=1000)  # "a" is cut into keys
        params = client.pull()
        for step in range(6):
            grads = {k: np.cos(v * (step + 1)).astype(np.float32) for k, v in params.items()}
            if step % 2:
                params = client.push_pull(grads, step).params
            else:
                client.push(grads, step)
                params = client.pull()
        return params


def test_a_worker_on_the_servers_host_calls_over_the_local_channel_with_the_same_numbers():
    ends, calls = {}, {}
    for shared in (False, True):
        running = serve(mode="async", workers=1)
        try:
            ends[shared] = _train(running.address, shared)
            calls[shared] = running.local.calls
        finally:
            running.stop(0)
    assert calls[False] == 0  # without a mailbox, everything goes through gRPC
    assert calls[True] >= 6  # every push, pull and PushPull (chunks: more)
    for name, value in ends[False].items():
        assert np.array_equal(ends[True][name], value), name


@pytest.fixture
def running():
    running = serve(mode="sync", workers=2)
    with PSClient([running.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    yield running
    running.stop(0)


def _push(step: int) -> bytes:
    return encode_push_request(0, step, [("b", 0, np.ones(5, np.float32), 0)])


def test_errors_come_back_with_the_codes_and_words_of_grpc(running):
    channel = LocalChannel(running.local.name, running.local.key)
    before = running.store.stats()
    try:
        cases = [("Push", _push(5)), ("Push", b"\xff\xff"), ("Pull", b"\x08"),
                 ("PushPull", encode_push_request(7, 0, []))]
        with grpc.insecure_channel(running.address) as grpc_channel:
            for method, request in cases:
                with pytest.raises(LocalError) as local:
                    channel.call(method, request, 10)
                # bytes as they are: a stub's own serialisers would refuse bad ones
                call = grpc_channel.unary_unary(f"/tinyps.ParameterServer/{method}")
                with pytest.raises(grpc.RpcError) as remote:
                    call(request, timeout=10)
                assert local.value.code == remote.value.code(), method
                assert local.value.details == remote.value.details(), method
        assert local.value.code == grpc.StatusCode.INVALID_ARGUMENT  # worker 7 of 2
    finally:
        channel.close()
    after = running.store.stats()
    assert (after["pushes"], after["updates"]) == (before["pushes"], before["updates"])


def test_a_wait_past_its_deadline_is_deadline_exceeded(running):
    with PSClient([running.address], worker_id=0, shared_memory=True, wait_s=0.5) as client:
        client.push({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
        calls = running.local.calls
        with pytest.raises(PSError) as err:
            client.pull(1)  # sync: waits for worker 1's step 0, which never comes
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert running.local.calls > calls  # answered on the local channel, by the server
        np.testing.assert_array_equal(client.pull()["b"], PARAMS["b"])  # and it goes on


def test_a_wrong_key_is_refused_and_the_server_goes_on(running):
    request = ps_pb2.PullRequest(worker=0, step=-1).SerializeToString()
    for key in (b"x" * 32, running.local.key[:31], b""):
        stranger = LocalChannel(running.local.name, key)
        with pytest.raises(LocalUnavailable, match="refused|cannot connect"):
            stranger.call("Pull", request, 10)
        stranger.close()
    friend = LocalChannel(running.local.name, running.local.key)
    try:
        assert ps_pb2.PullReply.FromString(friend.call("Pull", request, 10)).values
    finally:
        friend.close()


def _connect(running) -> socket.socket:
    """A raw connection that has shown the key."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect("\0" + running.local.name)
    key = running.local.key
    conn.sendall(np.array([len(key)], "<u4").tobytes() + b"\0" + b"\0" * 8 + key)
    assert conn.recv(6) == b"\0\0\0\0\0\0"  # an empty OK, no reason
    return conn


def test_a_malformed_frame_is_answered_then_the_connection_closed(running):
    for method, size, timeout in [(9, 0, 1.0), (1, 2**31, 1.0), (1, 0, float("nan"))]:
        conn = _connect(running)
        try:
            conn.sendall(np.array([size], "<u4").tobytes() + bytes([method])
                         + np.array([timeout], "<f8").tobytes())
            header = conn.recv(6, socket.MSG_WAITALL)
            length = int.from_bytes(header[:4], "little")
            assert header[4] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert header[5] == 0  # no reason: the details follow at once
            assert b"malformed local frame" in conn.recv(length, socket.MSG_WAITALL)
            assert conn.recv(1) == b""  # closed: the stream cannot be trusted after it
        finally:
            conn.close()
    assert wait_pull(running)


def wait_pull(running) -> bool:
    with PSClient([running.address], shared_memory=True) as client:
        return np.array_equal(client.pull()["b"], PARAMS["b"])


def test_stop_ends_the_connections_and_the_listener():
    running = serve(mode="async", workers=1)
    channel = LocalChannel(running.local.name, running.local.key)
    request = ps_pb2.PullRequest(worker=0, step=-1).SerializeToString()
    with PSClient([running.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    channel.call("Pull", request, 10)  # one idle connection, kept for the next call
    running.stop(0)
    with pytest.raises(LocalUnavailable):
        channel.call("Pull", request, 10)  # the kept connection was shut
    with pytest.raises(LocalUnavailable, match="cannot connect"):
        channel.call("Pull", request, 10)  # and no one listens any more
    channel.close()


def test_a_restarted_server_gives_a_new_channel_and_the_worker_takes_it():
    running = serve(mode="async", workers=1)
    port = running.port
    with PSClient([running.address], shared_memory=True) as client:
        client.init(PARAMS, "sgd", lr=0.5)
        client.pull()
        first = client.links[0].channel.name
        running.stop(0)
        running = serve(port=port, mode="async", workers=1)
        try:
            client.init(PARAMS, "sgd", lr=0.5)
            result = client.push_pull({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
            assert client.links[0].channel.name == running.local.name != first
            assert running.local.calls > 0
            for name, value in PARAMS.items():
                np.testing.assert_allclose(result.params[name], value - 0.5, rtol=1e-6)
        finally:
            running.stop(0)


def test_a_token_guards_the_key_and_then_the_channel_serves():
    running = serve(mode="async", workers=1, token="s3cret")
    try:
        with PSClient([running.address], token="s3cret", shared_memory=True) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            np.testing.assert_array_equal(client.pull()["b"], PARAMS["b"])
        assert running.local.calls > 0
        with PSClient([running.address], token="wrong", shared_memory=True) as client, \
                pytest.raises(PSError, match="UNAUTHENTICATED"):
            client.pull()  # Attach, which hands out the key, is refused first
    finally:
        running.stop(0)


# -- the channel alone, with handlers of the test's own -----------------------------------


def test_a_handler_that_fails_is_unknown_and_a_silent_one_meets_the_guard():
    release = threading.Event()

    def broken(payload: bytes, context) -> bytes:
        raise KeyError("bug")

    def silent(payload: bytes, context) -> bytes:
        release.wait(30)
        return b"late"

    server = LocalServer({"Pull": broken, "Push": silent, "PushPull": lambda p, c: p[::-1]})
    assert server.start()
    channel = LocalChannel(server.name, server.key, guard_s=0.3)
    try:
        assert channel.call("PushPull", b"abc", 10) == b"cba"
        with pytest.raises(LocalError) as err:
            channel.call("Pull", b"", 10)
        assert err.value.code == grpc.StatusCode.UNKNOWN and "KeyError" in err.value.details
        with pytest.raises(LocalError) as err:
            channel.call("Push", b"", 10)  # the server never answers: the guard does
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert channel.call("PushPull", b"xy", 10) == b"yx"  # a new connection
        assert server.calls == 3
    finally:
        release.set()
        channel.close()
        server.stop()
