"""Admission to a local channel (ps/local.py): another user's connections are closed before any
read, slot or thread; a hello has a deadline; connections in their hello cannot take the slots
of workers; a frame that no request is gets INVALID_ARGUMENT or a close, never a hang."""

import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from deadline import in_thread, wait_until

from ps.client import PSClient
from ps.codec import MAX_MESSAGE_BYTES
from ps.local import MAX_HELLOS, LocalBusy, LocalChannel, LocalServer
from ps.server import serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="local channels need Linux's abstract Unix sockets")

PARAMS = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
          "b": np.linspace(0, 1, 5, dtype=np.float32)}
NOBODY = 65534  # the uid and gid of "nobody" on Linux
ECHO = {"Pull": lambda p, c: p, "Push": lambda p, c: p, "PushPull": lambda p, c: p[::-1]}

# Another user: connects `count` times to the abstract socket argv[1] (showing the key argv[3]
# if there is one), says "connected", then how many of its connections the server closed and
# how many bytes it answered, and holds everything until its stdin closes.
STRANGER = r"""
import os, socket, sys, time
name, count, key = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
os.setgid(NOBODY)
os.setuid(NOBODY)
conns = []
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect("\0" + name)  # blocking: waits its turn in the listen queue
    conns.append(conn)
for conn in conns:
    if key:
        try:
            conn.sendall(len(key).to_bytes(4, "little") + bytes(9) + key)
        except OSError:
            pass  # already closed
print("connected", flush=True)
deadline, closed, answered = time.monotonic() + 10, 0, 0
for conn in conns:
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while data := conn.recv(64):
            answered += len(data)
        closed += 1
    except ConnectionResetError:
        closed += 1
    except TimeoutError:
        pass
print(f"closed {closed} answered {answered}", flush=True)
sys.stdin.read()
""".replace("NOBODY", str(NOBODY))


class Stranger:
    """The STRANGER script in a child process; ended on exit, whatever happened."""

    def __init__(self, name: str, count: int, key: bytes = b"") -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", STRANGER, name, str(count), key.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self) -> str:
        return in_thread(self.child.stdout.readline, deadline_s=30)().strip()

    def __enter__(self) -> "Stranger":
        return self

    def __exit__(self, *exc) -> None:
        self.child.stdin.close()
        try:
            self.child.wait(10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait(10)
        self.child.stdout.close()


def _raw(name: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect("\0" + name)
    return conn


def _until_closed(conn: socket.socket, deadline_s: float = 10.0) -> bytes:
    """Every byte the server sends before it closes the connection (within the deadline)."""
    conn.settimeout(deadline_s)
    parts = []
    try:
        while data := conn.recv(4096):
            parts.append(data)
    except ConnectionResetError:
        pass  # closed with our bytes unread: closed all the same
    except TimeoutError:
        raise AssertionError(f"the server kept the connection over {deadline_s} s") from None
    return b"".join(parts)


def _frame(size: int, method: int, timeout: float, body: bytes = b"") -> bytes:
    return (np.array([size], "<u4").tobytes() + bytes([method])
            + np.array([timeout], "<f8").tobytes() + body)


def _conn_threads() -> int:
    return sum(t.name == "local-conn" for t in threading.enumerate())


@pytest.fixture
def running():
    running = serve(mode="async", workers=1)
    with PSClient([running.address]) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    yield running
    running.stop(0)


def _local_pull(running, client: PSClient) -> float:
    """Seconds one pull took; it must come back right and over the local channel."""
    calls, start = running.local.calls, time.monotonic()
    np.testing.assert_array_equal(client.pull()["b"], PARAMS["b"])
    took = time.monotonic() - start
    assert running.local.calls > calls, "the pull went through gRPC, not the local channel"
    return took


# -- another user ---------------------------------------------------------------------------


def test_another_users_300_silent_connections_are_closed_at_accept_and_a_worker_still_calls(
        running):
    threads = _conn_threads()
    with Stranger(running.local.name, 300) as stranger:
        assert stranger.line() == "connected"
        with PSClient([running.address], shared_memory=True) as client:
            assert _local_pull(running, client) < 5.0  # the worker's hello was not reset
        assert stranger.line() == "closed 300 answered 0"  # before any read: nothing said
        assert running.local.strangers == 300
        assert running.local.hellos == 0  # no slot taken by a stranger
        # No thread either: the worker's own connection thread ends once it sees the close,
        # which on a loaded machine may be a moment after the client has closed.
        wait_until(lambda: _conn_threads() == threads, "the worker's connection thread ends")


def test_another_user_with_the_key_is_closed_unanswered(running):
    with Stranger(running.local.name, 5, running.local.key) as stranger:
        assert stranger.line() == "connected"
        assert stranger.line() == "closed 5 answered 0"
    assert running.local.strangers == 5 and running.local.calls == 0


# -- our own user, without the key ----------------------------------------------------------


def test_a_silent_flood_holds_only_the_hello_slots_and_only_until_the_hello_deadline():
    server = LocalServer(ECHO, hello_s=1.5, max_hellos=8, max_connections=16)
    assert server.start()
    friend = LocalChannel(server.name, server.key)
    flood: list[socket.socket] = []
    try:
        assert friend.call("PushPull", b"abc", 10) == b"cba"  # a worker's kept connection
        threads = _conn_threads()
        opened = time.monotonic()
        flood = [_raw(server.name) for _ in range(40)]  # accepted in this order
        busy = [_until_closed(conn) for conn in flood[8:]]  # told "full" and closed at once
        assert all(a[4] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for a in busy), busy
        assert b"is full: 8 connections in their hello (at most 8)" in busy[0]
        wait_until(lambda: _conn_threads() == threads + 8, "a thread for each of the 8")
        assert server.hellos == 8  # and none for the other 32
        assert friend.call("PushPull", b"xyz", 10) == b"zyx"  # the worker is served meanwhile
        with pytest.raises(LocalBusy, match="is full"):
            LocalChannel(server.name, server.key).call("Pull", b"", 10)  # a newcomer waits
        assert [_until_closed(conn) for conn in flood[:8]] == [b""] * 8  # unanswered
        assert time.monotonic() - opened >= 1.5  # held until the hello's deadline
        wait_until(lambda: server.hellos == 0 and _conn_threads() == threads,
                   "the flood's slots and threads freed")
        newcomer = LocalChannel(server.name, server.key)
        assert newcomer.call("PushPull", b"ok", 10) == b"ko"
        newcomer.close()
    finally:
        for conn in flood:
            conn.close()
        friend.close()
        server.stop()


def test_a_worker_whose_new_connection_finds_no_slot_calls_grpc_once_and_keeps_the_channel(
        running):
    with PSClient([running.address], shared_memory=True) as client:
        _local_pull(running, client)
        channel = client.links[0].channel
        flood = [_raw(running.local.name) for _ in range(MAX_HELLOS)]
        try:
            wait_until(lambda: running.local.hellos == MAX_HELLOS, "the hello slots full")
            channel.close()  # its kept connections: the next call needs a new one
            calls, start = running.local.calls, time.monotonic()
            np.testing.assert_array_equal(client.pull()["b"], PARAMS["b"])
            assert time.monotonic() - start < 5.0
            assert running.local.calls == calls  # through gRPC, at once
            assert client.links[0].channel is channel  # and the channel is kept
        finally:
            for conn in flood:
                conn.close()
        wait_until(lambda: running.local.hellos == 0, "the flood's slots freed")
        _local_pull(running, client)  # the channel again


def test_served_connections_have_their_bound_and_a_freed_slot_is_taken_again():
    server = LocalServer(ECHO, max_connections=2)
    assert server.start()
    channels = [LocalChannel(server.name, server.key) for _ in range(3)]
    try:
        for channel in channels[:2]:
            assert channel.call("Pull", b"a", 10) == b"a"  # each keeps its connection
        with pytest.raises(LocalBusy, match=r"0 connections in their hello \(at most 32\), "
                                            r"2 served \(at most 2\)"):
            channels[2].call("Pull", b"b", 10)
        channels[0].close()
        wait_until(lambda: server.admitted == 1, "a served slot freed")
        assert channels[2].call("Pull", b"c", 10) == b"c"
        assert server.admitted == 2 and server.hellos == 0
    finally:
        for channel in channels:
            channel.close()
        server.stop()


@pytest.mark.parametrize("frame", [
    _frame(32, 0, 0.0, b"k" * 32),  # a wrong key
    _frame(31, 0, 0.0, b"k" * 31),  # too short for a key
    _frame(33, 0, 0.0, b"k" * 33),
    _frame(0, 0, 0.0),
    _frame(2**32 - 1, 0, 0.0),  # a body no key has
    _frame(32, 1, 1.0, b"k" * 32),  # a request before any hello
    _frame(32, 255, float("nan"), b"k" * 32),
], ids=["wrong key", "31 bytes", "33 bytes", "empty", "4 GiB", "Pull first", "method 255"])
def test_a_wrong_hello_is_closed_at_once_unanswered(frame):
    server = LocalServer(ECHO, hello_s=30.0)  # a deadline far off: the close is not it
    assert server.start()
    threads = _conn_threads()
    try:
        conn = _raw(server.name)
        start = time.monotonic()
        conn.sendall(frame)
        assert _until_closed(conn) == b""
        assert time.monotonic() - start < 5.0
        conn.close()
        wait_until(lambda: server.hellos == 0 and _conn_threads() == threads, "thread ended")
        assert server.calls == 0
    finally:
        server.stop()


def _drip(conn: socket.socket, data: bytes, every_s: float) -> None:
    """Send a byte at a time, as a slow client would (pacing, not synchronisation)."""
    for i in range(len(data)):
        try:
            conn.send(data[i:i + 1])
        except OSError:
            return  # closed by the server: what the test wants
        threading.Event().wait(every_s)


@pytest.mark.parametrize("sent", ["nothing", "half a header", "a header and part of the key",
                                  "a byte every 0.1 s"])
def test_a_partial_or_slow_hello_is_closed_at_the_deadline(sent):
    server = LocalServer(ECHO, hello_s=0.5)
    assert server.start()
    threads = _conn_threads()
    try:
        conn = _raw(server.name)
        start = time.monotonic()
        hello = _frame(32, 0, 0.0, server.key)
        if sent == "half a header":
            conn.sendall(hello[:6])
        elif sent == "a header and part of the key":
            conn.sendall(hello[:23])
        elif sent == "a byte every 0.1 s":  # the whole hello would take 4.5 s
            threading.Thread(target=_drip, args=(conn, hello, 0.1), daemon=True).start()
        assert _until_closed(conn) == b""
        took = time.monotonic() - start
        assert 0.5 <= took < 3.0, took  # at the deadline: one for the hello, not per read
        conn.close()
        wait_until(lambda: server.hellos == 0 and _conn_threads() == threads, "thread ended")
    finally:
        server.stop()


# -- our own user, with the key: frames that no request is ---------------------------------


@pytest.mark.parametrize("header", [
    (0, 1, float("inf")), (0, 1, float("-inf")), (0, 1, -1.0), (0, 1, -1e-300),
    (0, 1, float("nan")), (MAX_MESSAGE_BYTES + 1, 1, 1.0), (2**32 - 1, 3, 1.0),
    (32, 0, 1.0), (0, 4, 1.0), (0, 255, 1.0),
], ids=["inf s", "-inf s", "-1 s", "-tiny s", "nan s", "a byte too long", "4 GiB",
        "a second hello", "method 4", "method 255"])
def test_a_malformed_request_is_invalid_argument_and_closed(header):
    server = LocalServer(ECHO)
    assert server.start()
    threads = _conn_threads()
    try:
        conn = _raw(server.name)
        conn.sendall(_frame(32, 0, 0.0, server.key) + _frame(*header))
        answer = _until_closed(conn)
        assert answer[:6] == bytes(6)  # the hello's OK
        size, status = int.from_bytes(answer[6:10], "little"), answer[10]
        assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answer[12:].startswith(b"malformed local frame") and len(answer) == 12 + size
        conn.close()
        wait_until(lambda: _conn_threads() == threads, "thread ended")
        assert server.calls == 0 and server.admitted == 0
    finally:
        server.stop()


def test_a_truncated_request_ends_its_thread_when_the_peer_goes():
    server = LocalServer(ECHO)
    assert server.start()
    threads = _conn_threads()
    try:
        for cut in (3, 13, 20):  # in the header, right after it, in the body
            conn = _raw(server.name)
            conn.sendall(_frame(32, 0, 0.0, server.key) + _frame(100, 1, 1.0, b"x" * 100)[:cut])
            conn.shutdown(socket.SHUT_WR)
            assert _until_closed(conn) == bytes(6)  # the hello's OK, then the close
            conn.close()
        wait_until(lambda: _conn_threads() == threads and server.admitted == 0,
                   "threads ended")
        assert server.calls == 0
    finally:
        server.stop()


def test_the_bounds_are_checked():
    for bad in ({"hello_s": 0.0}, {"hello_s": float("nan")}, {"max_hellos": 0},
                {"max_connections": 0}):
        with pytest.raises(ValueError, match="LocalServer: hello_s must be > 0"):
            LocalServer(ECHO, **bad)
