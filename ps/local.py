"""Local channels: a worker's tensor calls to a server on its own host, over a Unix socket.

With a shared-memory mailbox (ps/mailbox.py) a Push, Pull or PushPull message holds only
names and offsets: a few hundred bytes, for which gRPC's Python machinery (a polling thread,
a hand-off to a thread pool, completion queues on both sides) costs more than the work, about
1 ms of a 4 ms sync step. So a server also listens on a Unix socket in Linux's abstract
namespace, and a worker that attached a mailbox sends the same request bytes there; a thread
per connection calls the same servicer methods and sends back the same reply bytes.
(TensorPipe, under PyTorch RPC, likewise moves peers on one host off TCP.) Everything else,
and every worker on another host, stays on gRPC.

Only a process of the server's own user that shows the channel's key may call: the key comes
in the reply to Attach, which gRPC's token check guards. Admission checks before it spends:
  - the peer's user (SO_PEERCRED, known at accept without a read) is checked in the accept
    loop, and another user's connection is closed there, before it takes a slot or a thread;
  - a connection then has HELLO_S seconds, in all, to show the key; a wrong hello is closed
    at once, a silent or slow one at the deadline;
  - connections still in their hello have slots of their own (MAX_HELLOS), apart from those
    that showed the key (MAX_CONNECTIONS): a flood of silent connections of our own user holds
    at most MAX_HELLOS threads, for HELLO_S seconds each, and never a worker's slot. A
    connection past either bound is told RESOURCE_EXHAUSTED and closed: its worker calls
    through gRPC this once and tries the channel again on its next call.

The frames are in ps/local_frames.py; the first of a connection is a hello with the key. A
frame that no request is (a method out of range, a body over MAX_MESSAGE_BYTES, a wait that is
not a finite number of seconds >= 0) is answered INVALID_ARGUMENT and its connection closed.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import os
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import grpc

from ps.codec import MAX_MESSAGE_BYTES
from ps.local_frames import (
    HELLO,
    METHODS,
    REPLY,
    REQUEST,
    STATUS,
    Handler,
    LocalBusy,
    LocalContext,
    LocalError,
    LocalUnavailable,
    read_reply,
    recv_before,
    recv_exactly,
    send_reply,
    send_request,
    timeval,
)

__all__ = ["HELLO_S", "MAX_CONNECTIONS", "MAX_HELLOS", "METHODS", "LocalBusy", "LocalChannel",
           "LocalContext", "LocalError", "LocalServer", "LocalUnavailable"]

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
# Connections that showed the key, per server: a bound on threads, far above what workers use
# (one connection per chunk in flight: 4 per server for each worker on this host, by default).
MAX_CONNECTIONS = 256
# Connections still in their hello, per server. A worker's hello takes well under a
# millisecond, so even 8 workers on this host opening their 4 connections at one instant fit;
# a same-user flood of silent connections holds no more than these, and no worker's slot.
MAX_HELLOS = 32
# Seconds a connection has, in all, to send its hello. A worker sends it right after connect,
# so it arrives in microseconds; 3 s leaves room for a loaded machine (a worker descheduled or
# paging) and frees a silent connection's slot and thread soon.
HELLO_S = 3.0
# The client's bound on connect (waiting in the listen queue, under a flood) and the hello's
# answer: above HELLO_S, so that a slow but honest hello meets the server's deadline first.
_CONNECT_S = 10.0


# -- the server side ------------------------------------------------------------------------


@dataclass
class LocalServer:
    """A server's local channel: a Unix socket in the abstract namespace, a thread per
    connection. `handlers` maps a name of METHODS to the servicer's method; `hello_s`,
    `max_hellos` and `max_connections` are HELLO_S, MAX_HELLOS and MAX_CONNECTIONS (tests
    shorten them)."""

    handlers: dict[str, Handler]
    name: str = ""  # the socket's abstract address, without the leading NUL
    key: bytes = b""
    calls: int = 0  # calls answered, errors included: tests and the curious read it
    strangers: int = 0  # connections of another user, closed at accept
    hello_s: float = HELLO_S
    max_hellos: int = MAX_HELLOS
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.hello_s > 0 or self.max_hellos < 1 or self.max_connections < 1:
            raise ValueError(f"LocalServer: hello_s must be > 0 and the bounds >= 1, got "
                             f"hello_s={self.hello_s}, max_hellos={self.max_hellos}, "
                             f"max_connections={self.max_connections}")
        self.name = f"tinyps-{secrets.token_hex(16)}"
        self.key = secrets.token_bytes(32)
        self._uid = os.geteuid()  # SO_PEERCRED gives the peer's effective user
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._hellos = 0  # connections in their hello
        self._admitted = 0  # connections that showed the key
        self._lock = threading.Lock()
        self._closed = False

    @property
    def hellos(self) -> int:
        """Connections still in their hello."""
        return self._hellos

    @property
    def admitted(self) -> int:
        """Connections that showed the key and are served."""
        return self._admitted

    def start(self) -> bool:
        """Listen; False where the platform has no abstract Unix sockets (then gRPC only)."""
        if not sys.platform.startswith("linux"):
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + self.name)
            # room for workers' connects while the accept loop closes a stranger's flood
            listener.listen(128)
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
        """Take connections: another user's is closed here, before any read, slot or
        thread; one past the bounds is told so and closed; the rest get a thread."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                with self._lock:
                    if self._closed:
                        return
                # a passing failure (no file descriptor left, a peer gone before accept):
                # the channel stays; a pause keeps the loop from spinning on it
                threading.Event().wait(0.01)
                continue
            try:
                _, uid, _ = _PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                uid = -1
            if uid != self._uid:
                conn.close()
                with self._lock:
                    self.strangers += 1
                continue
            with self._lock:
                closed = self._closed
                full = (self._hellos >= self.max_hellos
                        or self._admitted >= self.max_connections)
                if not (closed or full):
                    self._hellos += 1
                    self._connections.add(conn)
            if closed or full:
                if full and not closed:
                    self._refuse_busy(conn)
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="local-conn",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: as if the slots were full
                with self._lock:
                    self._hellos -= 1
                    self._connections.discard(conn)
                self._refuse_busy(conn)
                conn.close()

    def _refuse_busy(self, conn: socket.socket) -> None:
        """Tell a connection there is no slot for it (best effort, never blocking)."""
        details = (f"local channel {self.name} is full: {self._hellos} connections in their "
                   f"hello (at most {self.max_hellos}), {self._admitted} served (at most "
                   f"{self.max_connections})").encode()
        header = REPLY.pack(len(details), grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], 0)
        with contextlib.suppress(OSError):
            conn.send(header + details, socket.MSG_DONTWAIT)

    def _serve(self, conn: socket.socket) -> None:
        admitted = False
        try:
            admitted = self._admit(conn)
            if admitted:
                conn.settimeout(None)  # blocking again: no poll() on each call's reads
                send_reply(conn, 0, b"")
                while self._answer(conn):
                    pass
        except OSError:
            pass  # the worker went away, the hello's deadline passed, or stop() shut it
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._admitted -= admitted
            conn.close()

    def _admit(self, conn: socket.socket) -> bool:
        """The first frame, within hello_s, is a hello with the key; then the connection
        leaves the hello slots for the served ones (if one is free)."""
        shown = False
        try:
            shown = self._hello(conn)
        finally:
            with self._lock:
                self._hellos -= 1
                admitted = shown and self._admitted < self.max_connections
                self._admitted += admitted
        if shown and not admitted:
            self._refuse_busy(conn)
        return admitted

    def _hello(self, conn: socket.socket) -> bool:
        """The hello came whole before the deadline and shows the key."""
        deadline = time.monotonic() + self.hello_s
        header = recv_before(conn, REQUEST.size, deadline)
        if header is None:
            return False
        size, method, _ = REQUEST.unpack(header)
        if method != HELLO or size != len(self.key):
            return False  # closed at once: no wait for a body that cannot be the key
        body = recv_before(conn, size, deadline)
        return body is not None and hmac.compare_digest(body, self.key)

    def _answer(self, conn: socket.socket) -> bool:
        """Read one request, call its handler, send the reply; False when the peer is gone
        or sent a frame that no request is (the stream cannot be trusted after it)."""
        header = recv_exactly(conn, REQUEST.size)
        if header is None:
            return False
        size, method, timeout = REQUEST.unpack(header)
        if not 1 <= method <= len(METHODS) or size > MAX_MESSAGE_BYTES or \
                not 0.0 <= timeout < math.inf:
            send_reply(conn, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                       f"malformed local frame: method {method}, {size} bytes, timeout "
                       f"{timeout}".encode())
            return False
        body = recv_exactly(conn, size)
        if body is None:
            return False
        handler = self.handlers[METHODS[method - 1]]
        reason = b""
        try:
            reply, status = handler(body, LocalContext(timeout)), 0
        except LocalError as err:
            reply, status = err.details.encode(errors="backslashreplace"), err.code.value[0]
            reason = err.reason.encode(errors="backslashreplace")[:255]
        except Exception as err:  # a bug: answer as gRPC would (UNKNOWN), and say where
            traceback.print_exc()
            reply = f"{type(err).__name__}: {err}".encode(errors="backslashreplace")
            status = grpc.StatusCode.UNKNOWN.value[0]
        with self._lock:
            self.calls += 1
        send_reply(conn, status, reply, reason)
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
        self._guard = timeval(guard_s)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, method: str, request: bytes, timeout: float) -> bytes:
        """Send one request and return the reply's bytes. Raises LocalError for an error
        status, LocalUnavailable if the channel is gone (the caller then uses gRPC)."""
        conn = self._take()
        try:
            send_request(conn, METHODS.index(method) + 1, timeout, request)
            status, reason, body = read_reply(conn)
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
            code = STATUS.get(status, grpc.StatusCode.UNKNOWN)
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
            # Blocking, with the kernel's timeouts: under a flood a connect waits its turn in
            # the listen queue, where a non-blocking one (Python's settimeout) fails at once.
            connect = timeval(_CONNECT_S)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, connect)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, connect)
            conn.connect("\0" + self.name)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # a full server answers before it reads, and may have closed: read its answer
                send_request(conn, HELLO, 0.0, self._key)
            status, _, details = read_reply(conn)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._guard)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._guard)
        except (OSError, LocalUnavailable):
            conn.close()
            raise LocalUnavailable(f"cannot connect to local channel {self.name}") from None
        if status:
            conn.close()
            if status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                raise LocalBusy(details.decode(errors="replace"))
            raise LocalUnavailable(f"local channel {self.name} refused the key")
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
