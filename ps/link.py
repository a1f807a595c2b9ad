"""Links: how the client's verbs reach one server. The Link interface, and its plain twin: gRPC.

A link carries the control calls (protobuf messages in and out) and the three tensor calls
(pull, push, push_pull) to one server, with a deadline on each and retries while the server is
unavailable. GrpcLink puts the tensors in the messages; ps/local_link.py is the fast link to a
server on this host. A wrapper (an emulated slow link, a tracer) forwards these few methods.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import Message

from ps import ps_pb2, ps_pb2_grpc
from ps.codec import (
    MAX_MESSAGE_BYTES,
    WIRE_DTYPES,
    PullReplyView,
    decode_pull_reply,
    decode_slice,
    encode_push_request,
    unpack,
)
from ps.keys import Key
from ps.mailbox import REASON_KEY, Mailbox
from ps.security import TLSFiles, channel_credentials

__all__ = ["Gradients", "GrpcLink", "Link", "PSError", "open_channel"]

# Statuses that mean "the server is not there right now": wait and call again. CANCELLED is
# one: this client never cancels a call of its own, so a cancelled call is one that a
# stopping server received but never started (gRPC cancels those at shutdown).
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A restarted server is back within seconds: reconnect soon after, rather than
            # after gRPC's default backoff, which grows towards two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


class PSError(RuntimeError):
    """A call a server refused or could not answer; names the server and the status.
    `reason`: the server's machine-readable reason ("" if none; see ps.mailbox.REASON_KEY)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str,
                 reason: str = "") -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details
        self.reason = reason


@dataclass(frozen=True)
class Gradients:
    """One push to one server: a worker's step, and per key its gradient and read version."""

    step: int
    items: list[tuple[Key, np.ndarray, int]]  # key, flat float32 values (empty: skip), version
    dtype: str  # the wire format they travel in, and the weights of a push_pull come back in
    scale: float = 1.0  # the loss scale they carry
    skip: bool = False  # the worker found inf or NaN: no values, nothing applied


class Link(ABC):
    """One server as the client's verbs see it. Tensor calls write pulled weights into `out`
    (tensor name -> its flat float32 array) and return the reply, whose slices give versions."""

    address: str

    @abstractmethod
    def call(self, method: str, request: Message, timeout: float) -> Message:
        """A control call (Init, Layout, Version, Stats, Leave, Shutdown, Attach)."""

    @abstractmethod
    def pull(self, keys: Sequence[Key], step: int | None, dtype: str, timeout: float,
             out: dict[str, np.ndarray]) -> PullReplyView:
        """The weights of `keys` once `step` may be read (None: at once), sent as `dtype`."""

    @abstractmethod
    def push(self, grads: Gradients, timeout: float) -> ps_pb2.PushReply:
        """Send one step's gradients."""

    @abstractmethod
    def push_pull(self, grads: Gradients, timeout: float,
                  out: dict[str, np.ndarray]) -> PullReplyView:
        """Push, then the weights of the same keys for the next step, in one round trip."""

    @abstractmethod
    def set_keys(self, keys: Sequence[Key]) -> None:
        """The keys the server holds, after an init or a layout read (a fast link sizes its
        mailbox by them)."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the connection."""


def open_channel(address: str, tls: TLSFiles | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls), options=list(options))


def _methods(channel: grpc.Channel) -> dict[str, Callable]:
    """The service's methods on a channel. Pull replies and Push requests are bytes that
    ps.codec reads and writes (the same wire format, without protobuf's copies)."""
    stub = ps_pb2_grpc.ParameterServerStub(channel)
    methods = {name: getattr(stub, name)
               for name in ("Init", "Layout", "Version", "Stats", "Shutdown", "Leave",
                            "Attach")}
    prefix = "/tinyps.ParameterServer/"
    methods["Pull"] = channel.unary_unary(
        prefix + "Pull", request_serializer=ps_pb2.PullRequest.SerializeToString,
        _registered_method=True)
    methods["Push"] = channel.unary_unary(
        prefix + "Push", response_deserializer=ps_pb2.PushReply.FromString,
        _registered_method=True)
    methods["PushPull"] = channel.unary_unary(prefix + "PushPull", _registered_method=True)
    return methods


def _reason(err: grpc.RpcError) -> str:
    """The server's machine-readable reason for a refusal, from the trailing metadata."""
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if trailing else None) or ():
        if key == REASON_KEY:
            return value
    return ""


def _hint(code: grpc.StatusCode, details: str, tls: TLSFiles | None) -> str:
    """What a bare "Socket closed" most likely means, for someone who has not seen it before."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return ""
    if tls is None and "Socket closed" in details:
        # A TLS server drops a plaintext client's first bytes without a word.
        return (" (the server closed the connection at once: if it speaks TLS, give this "
                "client its CA, e.g. --tls-ca ca.pem)")
    if tls is not None and ("handshake" in details.lower() or "ssl" in details.lower()):
        return (" (the TLS handshake failed: does the server speak TLS, and was its "
                "certificate signed by this client's CA for this address?)")
    return ""


class GrpcLink(Link):
    """The plain link: every call through gRPC, tensors in the messages, as worker `worker`."""

    def __init__(self, address: str, worker: int = 0, token: str | None = None,
                 tls: TLSFiles | None = None, retry_s: float = 30.0) -> None:
        self.address = address
        self.worker = worker
        self.retry_s = retry_s  # how long to keep retrying an unavailable server
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = tls
        self._channel = open_channel(address, tls, _OPTIONS)
        self.methods = _methods(self._channel)  # name -> callable, looked up on every call

    def call(self, method: str, request, timeout: float):
        """One unary call with a deadline, retried with backoff while the server is down."""
        delay, give_up = 0.05, time.monotonic() + self.retry_s
        while True:
            try:
                return self.methods[method](request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() in _RETRYABLE and time.monotonic() + delay < give_up:
                    time.sleep(delay)  # backoff before a retry, not synchronisation
                    delay = min(2 * delay, 1.0)
                    continue
                details = (err.details() or "") + _hint(err.code(), err.details() or "",
                                                        self._tls)
                raise PSError(self.address, err.code(), details, _reason(err)) from None

    def pull(self, keys, step, dtype, timeout, out):
        request = pull_request(self.worker, keys, step, dtype)
        return read_reply(self.call("Pull", request, timeout), out)

    def push(self, grads, timeout):
        return self.call("Push", encode_push(self.worker, grads), timeout)

    def push_pull(self, grads, timeout, out):
        return read_reply(self.call("PushPull", encode_push(self.worker, grads), timeout), out)

    def set_keys(self, keys):
        pass  # the tensors travel in the messages: nothing to prepare

    def close(self) -> None:
        self._channel.close()


# -- the tensor messages, for this link and the fast one ------------------------------------


def pull_request(worker: int, keys: Sequence[Key], step: int | None, dtype: str,
                 mailbox: Mailbox | None = None,
                 offsets: dict | None = None) -> ps_pb2.PullRequest:
    """A PullRequest; with a mailbox, the weights are asked there, at each key's offset."""
    if mailbox is None:
        refs = [ps_pb2.KeyRef(name=k.name, start=k.start) for k in keys]
    else:
        refs = [ps_pb2.KeyRef(name=k.name, start=k.start, offset=offsets[k.id]) for k in keys]
    return ps_pb2.PullRequest(worker=worker, step=-1 if step is None else step, keys=refs,
                              dtype=dtype, mailbox="" if mailbox is None else mailbox.name)


def encode_push(worker: int, grads: Gradients, mailbox: Mailbox | None = None,
                offsets: list[int] | None = None) -> bytes:
    """PushRequest bytes; with a mailbox, the values are already there, at `offsets`."""
    items = [(k.name, k.start, values, version) for k, values, version in grads.items]
    return encode_push_request(worker, grads.step, items, grads.dtype,
                               0.0 if grads.scale == 1.0 else grads.scale, grads.skip, offsets,
                               "" if mailbox is None else mailbox.name)


def read_reply(reply: bytes, out: dict[str, np.ndarray],
               mailbox: Mailbox | None = None) -> PullReplyView:
    """Copy PullReply values (from the reply, or from the mailbox if it says they are there)
    into `out` and return the reply. Called on the receiving thread: NumPy releases the
    interpreter lock while it copies, so copies overlap the calls still on the wire."""
    view = decode_pull_reply(reply)
    if view.shared and mailbox is None:
        raise RuntimeError("the server answered through a mailbox this client has not got")
    for piece in view.slices:
        if view.shared:
            raw = mailbox.weights(piece.offset, WIRE_DTYPES[piece.dtype],
                                  math.prod(piece.shape))
            values = unpack(raw, piece.dtype)
        else:
            values = decode_slice(piece)
        out[piece.name][piece.start:piece.start + values.size] = values
    return view
