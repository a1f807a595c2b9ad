"""The fast link to a server on this host: tensors through a shared-memory mailbox, the tensor
calls over the server's local socket, as the plain gRPC link's twin (see ps/link.py).

It attaches a mailbox (ps/mailbox.py) on its first tensor call; the Attach reply names the
server's local channel (ps/local.py). A server on another host cannot map the mailbox: then
every call goes through the plain link it wraps. A server that restarted has lost the mailbox
and says so with a reason (MAILBOX_LOST), not in words: the link attaches again and calls again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from threading import Lock

import grpc

from ps import ps_pb2
from ps.codec import WIRE_DTYPES, pack
from ps.keys import Key, KeyId
from ps.link import Gradients, GrpcLink, Link, PSError, encode_push, pull_request, read_reply
from ps.local import LocalBusy, LocalChannel, LocalError, LocalUnavailable
from ps.mailbox import MAILBOX_LOST, Mailbox

__all__ = ["LocalLink"]

_UNTRIED = object()  # no Attach yet since the layout was set


class LocalLink(Link):
    """The plain link `plain`, with tensors through a mailbox when the server can map it.
    `deadline_s`: of an Attach; `guard_s`: longer than any call waits (see LocalChannel)."""

    def __init__(self, plain: GrpcLink, deadline_s: float = 30.0,
                 guard_s: float = 600.0) -> None:
        self.plain = plain
        self.address = plain.address
        self.deadline_s = deadline_s
        self.guard_s = guard_s
        self._lock = Lock()  # chunks in flight at once attach one mailbox
        self._offsets: dict[KeyId, int] = {}  # key -> its byte offset in the mailbox
        self._size = 4  # bytes of each half of the mailbox
        self.mailbox: Mailbox | None | object = _UNTRIED  # None: the server cannot map it
        self.channel: LocalChannel | None = None  # the server's local socket, with the mailbox

    @property
    def methods(self) -> dict:
        """The plain link's gRPC methods (tests replace one to script a failure)."""
        return self.plain.methods

    @property
    def attached(self) -> bool:
        """An Attach was tried since the layout was set (mailbox None: it was refused)."""
        return self.mailbox is not _UNTRIED

    def set_keys(self, keys: Sequence[Key]) -> None:
        # Each key has the room of its float32 values, whatever the wire format, so that one
        # mailbox serves every format.
        offsets, at = {}, 0
        for k in keys:
            offsets[k.id] = at
            at += 4 * k.size
        with self._lock:
            self._drop()
            self._offsets, self._size = offsets, max(at, 4)

    def call(self, method, request, timeout):
        return self.plain.call(method, request, timeout)

    def pull(self, keys, step, dtype, timeout, out):
        def request(mailbox: Mailbox | None) -> ps_pb2.PullRequest:
            return pull_request(self.plain.worker, keys, step, dtype, mailbox, self._offsets)
        reply, mailbox = self._tensor_call("Pull", request, timeout)
        return read_reply(reply, out, mailbox)

    def push(self, grads, timeout):
        return self._tensor_call("Push", lambda mailbox: self._encode(grads, mailbox),
                                 timeout)[0]

    def push_pull(self, grads, timeout, out):
        reply, mailbox = self._tensor_call(
            "PushPull", lambda mailbox: self._encode(grads, mailbox), timeout)
        return read_reply(reply, out, mailbox)

    def close(self) -> None:
        with self._lock:
            self._drop()
        self.plain.close()

    # -- the mailbox and the local channel -----------------------------------------------

    def _encode(self, grads: Gradients, mailbox: Mailbox | None) -> bytes:
        """PushRequest bytes; with a mailbox, the values go there and the message says where.
        Runs on the sending thread, so that the copy overlaps other calls."""
        if mailbox is None:
            return encode_push(self.plain.worker, grads)
        offsets = [self._offsets[k.id] for k, _, _ in grads.items]
        wire_type = WIRE_DTYPES[grads.dtype]
        for (_, values, _), offset in zip(grads.items, offsets, strict=True):
            pack(values, grads.dtype, mailbox.gradients(offset, wire_type, values.size))
        return encode_push(self.plain.worker, grads, mailbox, offsets)

    def _tensor_call(self, method: str, build: Callable[[Mailbox | None], object],
                     timeout: float) -> tuple[object, Mailbox | None]:
        """(reply, the mailbox the request was built for). A server that has lost the
        mailbox says so (reason MAILBOX_LOST): attach again, call again, once."""
        mailbox, channel = self._attach()
        try:
            return self._send(method, build(mailbox), timeout, channel), mailbox
        except PSError as err:
            if mailbox is None or err.reason != MAILBOX_LOST:
                raise
        with self._lock:
            if self.mailbox is mailbox:  # no other thread has replaced it yet
                self._drop()
        mailbox, channel = self._attach()
        return self._send(method, build(mailbox), timeout, channel), mailbox

    def _send(self, method: str, request, timeout: float, channel: LocalChannel | None):
        """Over the local channel if there is one, else through gRPC. A channel that is gone
        (the server stopped or restarted) is dropped, and gRPC retries until it is back; one
        that is full (ps.local's admission) is kept, and this call goes through gRPC."""
        if channel is not None:
            payload = request if isinstance(request, bytes) else request.SerializeToString()
            try:
                reply = channel.call(method, payload, timeout)
            except LocalBusy:
                pass  # no slot for a new connection now: gRPC this once, the channel stays
            except LocalUnavailable:
                with self._lock:
                    if self.channel is channel:
                        self.channel = None
                        channel.close()
            except LocalError as err:
                raise PSError(self.address, err.code, err.details, err.reason) from None
            else:
                return ps_pb2.PushReply.FromString(reply) if method == "Push" else reply
        return self.plain.call(method, request, timeout)

    def _attach(self) -> tuple[Mailbox | None, LocalChannel | None]:
        """The mailbox and local channel, attaching on first use; (None, None): send bytes."""
        with self._lock:
            if self.mailbox is _UNTRIED:
                self.mailbox, self.channel = self._new_mailbox()
            return self.mailbox, self.channel

    def _new_mailbox(self) -> tuple[Mailbox | None, LocalChannel | None]:
        mailbox = Mailbox.create(self._size)
        try:
            reply = self.plain.call("Attach", ps_pb2.AttachRequest(
                worker=self.plain.worker, name=mailbox.name, size=mailbox.size),
                self.deadline_s)
        except PSError as err:
            mailbox.unlink()
            mailbox.close()
            if err.code not in (grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.UNIMPLEMENTED):
                raise
            return None, None  # the server cannot map it (another host): bytes it is
        mailbox.unlink()  # both have it mapped: the name is no longer needed
        channel = None
        if reply.channel:
            channel = LocalChannel(reply.channel, reply.channel_key, guard_s=self.guard_s)
        return mailbox, channel

    def _drop(self) -> None:
        """Let go of the mailbox and the channel (the caller holds the lock)."""
        if isinstance(self.mailbox, Mailbox):
            self.mailbox.close()
        if self.channel is not None:
            self.channel.close()
        self.mailbox, self.channel = _UNTRIED, None
