"""The local channel's frames (ps/local.py): their headers, reading and writing them, with or
without a deadline, and the errors a call over the channel raises.

A frame is a little-endian header and a body:
  request  <IBd  body length, method (METHODS), seconds the caller waits   then the body
  reply    <IBB  body length, status (0: OK; else a grpc.StatusCode's number), length r of a
               reason   then the reply's bytes; for an error, r bytes of UTF-8 reason (what
               gRPC carries as trailing metadata, see ps.mailbox.REASON_KEY) and the details
The first request of a connection is a hello (method HELLO, 0) whose body is the key.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import grpc

from ps.mailbox import REASON_KEY

__all__ = ["HELLO", "METHODS", "REPLY", "REQUEST", "STATUS", "Handler", "LocalBusy",
           "LocalContext", "LocalError", "LocalUnavailable", "read_reply", "recv_before",
           "recv_exactly", "send_reply", "send_request", "timeval"]

METHODS = ("Pull", "Push", "PushPull")  # numbered from 1; 0 is the hello
HELLO = 0
REQUEST = struct.Struct("<IBd")
REPLY = struct.Struct("<IBB")
STATUS = {code.value[0]: code for code in grpc.StatusCode}


class LocalError(Exception):
    """A call the server answered with an error status: the servicer's code and details, and
    its machine-readable reason ("" if none)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason


class LocalUnavailable(Exception):
    """The channel is gone (the server stopped or restarted): call through gRPC instead."""


class LocalBusy(LocalUnavailable):
    """The channel has no free slot for a new connection now: call through gRPC this once, and
    keep the channel for the next call."""


class LocalContext:
    """What a servicer method needs of a call's context: its deadline, trailing metadata (only
    the reason travels), and abort."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._reason = ""

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata) -> None:
        self._reason = dict(metadata).get(REASON_KEY, "")

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise LocalError(code, details, self._reason)


Handler = Callable[[bytes, LocalContext], bytes]


def recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    """`size` bytes from the socket; None if it closes first."""
    data = conn.recv(size, socket.MSG_WAITALL)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:  # a signal, or a body larger than the socket's buffer
        if not data:
            return None
        data = conn.recv(size - got, socket.MSG_WAITALL)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def recv_before(conn: socket.socket, size: int, deadline: float) -> bytes | None:
    """`size` bytes before `deadline` (time.monotonic()); None if the socket closes or the
    deadline passes first. One deadline for all the reads: a byte now and then does not
    keep a connection."""
    parts, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            data = conn.recv(size - got)
        except TimeoutError:
            return None
        if not data:
            return None
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _send_frame(conn: socket.socket, header: bytes, body: bytes) -> None:
    if len(body) < 65536:
        conn.sendall(header + body)
    else:  # one copy fewer than joining a large body to its header
        conn.sendall(header)
        conn.sendall(body)


def send_reply(conn: socket.socket, status: int, body: bytes, reason: bytes = b"") -> None:
    _send_frame(conn, REPLY.pack(len(reason) + len(body), status, len(reason)), reason + body)


def timeval(seconds: float) -> bytes:
    """A struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it."""
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def send_request(conn: socket.socket, method: int, timeout: float, body: bytes) -> None:
    _send_frame(conn, REQUEST.pack(len(body), method, timeout), body)


def read_reply(conn: socket.socket) -> tuple[int, str, bytes]:
    """(status, reason, body) of one reply frame."""
    header = recv_exactly(conn, REPLY.size)
    if header is None:
        raise LocalUnavailable("the server closed the channel")
    size, status, reason_size = REPLY.unpack(header)
    body = recv_exactly(conn, size) if size else b""
    if body is None:
        raise LocalUnavailable("the server closed the channel")
    if reason_size > len(body):
        raise LocalUnavailable(f"malformed reply frame: a reason of {reason_size} bytes in a "
                               f"body of {len(body)}")
    if reason_size:
        return status, body[:reason_size].decode(errors="replace"), body[reason_size:]
    return status, "", body
