"""Thousands of random and mutated frames against a live server's local channel (ps/local.py):
hellos and Pull, Push and PushPull frames with bits flipped, cut short, lengths and waits
absurd, junk. The server stays up, answers each frame with a proper status or closes the
connection (never UNKNOWN, never a hang), ends every connection's thread, and serves a real
worker after."""

import socket
import sys
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
from deadline import wait_until

from ps import ps_pb2
from ps.client import PSClient
from ps.codec import MAX_MESSAGE_BYTES, encode_push_request
from ps.server import serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="local channels need Linux's abstract Unix sockets")

CASES = 2000  # connections, each with a hello and up to three requests
PARAMS = {"dense0.weight": np.ones((3, 4), np.float32), "dense0.bias": np.zeros(4, np.float32)}
WAITS = [float("nan"), float("inf"), float("-inf"), -1.0, -0.0, 0.0, 5e-324, 1e-300, 1e308]
SIZES = [MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1, 2**31, 2**32 - 1]


def _frame(size: int, method: int, wait: float, body: bytes) -> bytes:
    return (np.array([size], "<u4").tobytes() + bytes([method])
            + np.array([wait], "<f8").tobytes() + body)


def _request(rng: np.random.Generator) -> bytes:
    """A valid Pull, Push or PushPull frame."""
    method = int(rng.integers(1, 4))
    if method == 1:
        body = ps_pb2.PullRequest(worker=0, step=int(rng.integers(-1, 3)),
                                  dtype=str(rng.choice(["", "float16"]))).SerializeToString()
    else:
        items = [(name, 0, (rng.standard_normal(v.size) * 1e-3).astype(np.float32), 0)
                 for name, v in PARAMS.items()]
        body = encode_push_request(0, int(rng.integers(0, 3)), items)
    return _frame(len(body), method, float(rng.uniform(0, 5)), body)


def _mutate(rng: np.random.Generator, frame: bytes) -> bytes:
    data = bytearray(frame)
    kind = int(rng.integers(8))
    if kind == 0:  # flip bits anywhere, header included
        for i in rng.integers(0, len(data), rng.integers(1, 8)):
            data[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # cut short
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == 2:  # junk
        data = bytearray(rng.bytes(int(rng.integers(0, 64))))
    elif kind == 3:  # junk inserted
        at = int(rng.integers(0, len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 20)))
    elif kind == 4:  # a length that is not the body's
        size = int(rng.choice(SIZES)) if rng.random() < 0.5 else \
            max(0, len(data) - 13 + int(rng.integers(-20, 20)))
        data[0:4] = np.array([size], "<u4").tobytes()
    elif kind == 5:  # a wait that no caller means
        data[5:13] = np.array([rng.choice(WAITS)], "<f8").tobytes()
    elif kind == 6:  # any method
        data[4] = int(rng.integers(256))
    else:  # the body alone flipped, its length kept
        for i in rng.integers(13, max(14, len(data)), rng.integers(1, 8)):
            if i < len(data):
                data[i] ^= 1 << int(rng.integers(8))
    return bytes(data)


def _exchange(name: str, frames: list[bytes]) -> tuple[bytes, bool]:
    """Send the frames, say we are done, and read until the server closes: (its bytes,
    whether our sending was cut short by its close)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)  # a hang fails the test, below
    cut = False
    try:
        conn.connect("\0" + name)
        try:
            conn.sendall(b"".join(frames))
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            cut = True
        parts = []
        try:
            while data := conn.recv(65536):
                parts.append(data)
        except ConnectionResetError:
            cut = True
        except TimeoutError:
            raise AssertionError(f"no close in 10 s after frames {frames!r}") from None
        return b"".join(parts), cut
    finally:
        conn.close()


def _replies(data: bytes) -> list[int]:
    """The status of each reply frame in a connection's bytes; they must parse whole."""
    statuses, at = [], 0
    while at < len(data):
        assert len(data) - at >= 6, f"a reply cut short: {data[at:]!r}"
        size, status, reason = int.from_bytes(data[at:at + 4], "little"), data[at + 4], \
            data[at + 5]
        assert reason <= size and at + 6 + size <= len(data), f"a bad reply: {data[at:]!r}"
        statuses.append(status)
        at += 6 + size
    return statuses


def test_a_server_survives_thousands_of_bad_local_frames(monkeypatch):
    escaped: list[BaseException] = []  # exceptions that ended a thread: none may
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    running = serve(mode="async", workers=1)  # async: no call waits on a barrier
    rng = np.random.default_rng(22)
    threads = lambda: sum(t.name == "local-conn" for t in threading.enumerate())  # noqa: E731
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=1e-3)
        before = threads()
        local = running.local
        hello = _frame(len(local.key), 0, 0.0, local.key)
        names = {code.value[0]: code.name for code in grpc.StatusCode}
        replies: Counter = Counter()
        frames = unanswered = cut = 0
        for _ in range(CASES):
            sent = [hello if rng.random() < 0.8 else _mutate(rng, hello)]
            for _ in range(int(rng.integers(0, 4))):
                request = _request(rng)
                sent.append(_mutate(rng, request) if rng.random() < 0.7 else request)
            data, was_cut = _exchange(local.name, sent)
            statuses = _replies(data)
            replies.update(names[s] for s in statuses)
            frames += len(sent)
            unanswered += len(sent) - len(statuses)
            cut += was_cut
        print(f"\nlocal-channel fuzz: {CASES} connections, {frames} frames tried; replies "
              f"{dict(sorted(replies.items()))}; {unanswered} frames closed unanswered "
              f"({cut} connections reset under our sending); UNKNOWN {replies['UNKNOWN']}")
        assert replies["UNKNOWN"] == 0 and replies["INTERNAL"] == 0, replies
        assert not escaped, escaped
        assert replies["INVALID_ARGUMENT"] > CASES / 10 and replies["OK"] > CASES, replies
        wait_until(lambda: threads() == before and local.hellos == 0 and local.admitted == 0,
                   "every connection's thread ended", deadline_s=10)
        calls = local.calls
        with PSClient([running.address], shared_memory=True) as client:
            assert client.pull()["dense0.bias"].shape == (4,)
        assert local.calls > calls  # a real worker, over the local channel
    finally:
        running.stop(0)
