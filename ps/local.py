"""Local channels: a worker's tensor calls to a server on its own host, over a Unix socket.

With a shared-memory mailbox (ps/mailbox.py) a Push, Pull or PushPull message holds only
names and offsets: a few hundred bytes, for which gRPC's Python machinery (a polling thread,
a hand-off to a thread pool, completion queues on both sides) costs more than the work, about
1 ms of a 4 ms sync step. So a server also listens on a Unix socket in Linux's abstract
namespace, and a worker that attached a mailbox sends the same request bytes there; a thread
per connection calls the same servicer methods and sends back the same reply bytes.
(TensorPipe, under PyTorch RPC, likewise moves peers on one host off TCP.) Everything else,
and every worker on another host, stays on gRPC.

Only a process of the server's own user (checked with SO_PEERCRED) that shows the channel's
key may call: the key comes in the reply to Attach, which gRPC's token check guards.

A frame is a little-endian header and a body:
  request  <IBd  body length, method (METHODS), seconds the caller waits   then the body
  reply    <IBB  body length, status (0: OK; else a grpc.StatusCode's number), length r of a
               reason   then the reply's bytes; for an error, r bytes of UTF-8 reason (what
               gRPC carries as trailing metadata, see ps.mailbox.REASON_KEY) and the details
The first request of a connection is a hello (method 0) whose body is the key.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ps.codec import MAX_MESSAGE_BYTES
from ps.mailbox import REASON_KEY

__all__ = ["METHODS", "LocalChannel", "LocalContext", "LocalError", "LocalServer",
           "LocalUnavailable"]

METHODS = ("Pull", "Push", "PushPull")  # numbered from 1; 0 is the hello
_HELLO = 0
_REQUEST = struct.Struct("<IBd")
_REPLY = struct.Struct("<IBB")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_MAX_CONNECTIONS = 256  # per server: a bound on threads, far above W workers' chunks in flight
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


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


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
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


def _send(conn: socket.socket, header: bytes, body: bytes) -> None:
    if len(body) < 65536:
        conn.sendall(header + body)
    else:  # one copy fewer than joining a large body to its header
        conn.sendall(header)
        conn.sendall(body)


def _reply(conn: socket.socket, status: int, body: bytes, reason: bytes = b"") -> None:
    _send(conn, _REPLY.pack(len(reason) + len(body), status, len(reason)), reason + body)


# -- the server side ------------------------------------------------------------------------


@dataclass
class LocalServer:
    """A server's local channel: a Unix socket in the abstract namespace, a thread per
    connection. `handlers` maps a name of METHODS to the servicer's method."""

    handlers: dict[str, Handler]
    name: str = ""  # the socket's abstract address, without the leading NUL
    key: bytes = b""
    calls: int = 0  # calls answered, errors included: tests and the curious read it

    def __post_init__(self) -> None:
        self.name = f"tinyps-{secrets.token_hex(16)}"
        self.key = secrets.token_bytes(32)
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> bool:
        """Listen; False where the platform has no abstract Unix sockets (then gRPC only)."""
        if not sys.platform.startswith("linux"):
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + self.name)
            listener.listen(64)
        except OSError:
            listener.close()
            return False
        self._listener = listener
        threading.Thread(target=self._accept, name="local-accept", daemon=True).start()
        return True

    def stop(self) -> None:
        """Stop listening and end every connection (their callers go back to gRPC)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        if self._listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone would not.
            for sock in [self._listener, *connections]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._closed or len(self._connections) >= _MAX_CONNECTIONS:
                    conn.close()  # the caller's hello fails: it calls through gRPC
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="local-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._admit(conn):
                while self._answer(conn):
                    pass
        except OSError:
            pass  # the worker went away, or stop() shut the socket
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _admit(self, conn: socket.socket) -> bool:
        """The peer runs as our user and its first frame is a hello with the key."""
        _, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        header = _recv_exactly(conn, _REQUEST.size)
        if header is None:
            return False
        size, method, _ = _REQUEST.unpack(header)
        if uid != os.getuid() or method != _HELLO or size != len(self.key):
            return False
        body = _recv_exactly(conn, size)
        if body is None or not hmac.compare_digest(body, self.key):
            return False
        _reply(conn, 0, b"")
        return True

    def _answer(self, conn: socket.socket) -> bool:
        """Read one request, call its handler, send the reply; False when the peer is gone
        or sent a frame that no request is (the stream cannot be trusted after it)."""
        header = _recv_exactly(conn, _REQUEST.size)
        if header is None:
            return False
        size, method, timeout = _REQUEST.unpack(header)
        if not 1 <= method <= len(METHODS) or size > MAX_MESSAGE_BYTES or not timeout >= 0:
            _reply(conn, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                   f"malformed local frame: method {method}, {size} bytes, timeout "
                   f"{timeout}".encode())
            return False
        body = _recv_exactly(conn, size)
        if body is None:
            return False
        handler = self.handlers[METHODS[method - 1]]
        reason = b""
        try:
            reply, status = handler(body, LocalContext(timeout)), 0
        except LocalError as err:
            reply, status = err.details.encode(), err.code.value[0]
            reason = err.reason.encode()[:255]
        except Exception as err:  # a bug: answer as gRPC would (UNKNOWN), and say where
            traceback.print_exc()
            reply = f"{type(err).__name__}: {err}".encode()
            status = grpc.StatusCode.UNKNOWN.value[0]
        with self._lock:
            self.calls += 1
        _reply(conn, status, reply, reason)
        return True


# -- the client side ------------------------------------------------------------------------


class LocalChannel:
    """A client's channel to one server's local socket; one connection per calling thread
    at a time, kept for the next call.

    The server answers DEADLINE_EXCEEDED itself just before a call's deadline, so the sockets
    block without a timeout of Python's (which costs system calls on every send and
    receive); `guard_s`, longer than any call waits, only guards against a server that
    stopped answering.
    """

    def __init__(self, name: str, key: bytes, guard_s: float = 600.0) -> None:
        self.name = name
        self._key = key
        self._guard = struct.pack("ll", int(guard_s), int(guard_s % 1 * 1e6))
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, method: str, request: bytes, timeout: float) -> bytes:
        """Send one request and return the reply's bytes. Raises LocalError for an error
        status, LocalUnavailable if the channel is gone (the caller then uses gRPC)."""
        conn = self._take()
        try:
            _send_request(conn, METHODS.index(method) + 1, timeout, request)
            status, reason, body = _read_reply(conn)
        except BlockingIOError:  # the guard's timeout
            conn.close()
            raise LocalError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"{method}: no answer from local channel {self.name}") from None
        except (OSError, LocalUnavailable):
            conn.close()
            raise LocalUnavailable(f"local channel {self.name} closed") from None
        with self._lock:
            self._idle.append(conn)
        if status:
            code = _STATUS.get(status, grpc.StatusCode.UNKNOWN)
            if code == grpc.StatusCode.UNAVAILABLE:
                raise LocalUnavailable(body.decode(errors="replace"))
            raise LocalError(code, body.decode(errors="replace"), reason)
        return body

    def _take(self) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(10.0)
            conn.connect("\0" + self.name)
            _send_request(conn, _HELLO, 0.0, self._key)
            status, _, _ = _read_reply(conn)
            conn.settimeout(None)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._guard)
        except (OSError, LocalUnavailable):
            conn.close()
            raise LocalUnavailable(f"cannot connect to local channel {self.name}") from None
        if status:
            conn.close()
            raise LocalUnavailable(f"local channel {self.name} refused the key")
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _send_request(conn: socket.socket, method: int, timeout: float, body: bytes) -> None:
    _send(conn, _REQUEST.pack(len(body), method, timeout), body)


def _read_reply(conn: socket.socket) -> tuple[int, str, bytes]:
    """(status, reason, body) of one reply frame."""
    header = _recv_exactly(conn, _REPLY.size)
    if header is None:
        raise LocalUnavailable("the server closed the channel")
    size, status, reason_size = _REPLY.unpack(header)
    body = _recv_exactly(conn, size) if size else b""
    if body is None:
        raise LocalUnavailable("the server closed the channel")
    if reason_size > len(body):
        raise LocalUnavailable(f"malformed reply frame: a reason of {reason_size} bytes in a "
                               f"body of {len(body)}")
    if reason_size:
        return status, body[:reason_size].decode(errors="replace"), body[reason_size:]
    return status, "", body
