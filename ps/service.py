"""The gRPC servicer: translates ParameterServer messages to store calls and back.

It validates and decodes, calls the store, builds the reply. It holds no training logic;
store errors map to gRPC status codes in one table.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import replace

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ps import ps_pb2, ps_pb2_grpc
from ps.codec import (
    CodecError,
    PushRequestView,
    WireSlice,
    decode_push_request,
    encode_pull_reply,
    pack,
)
from ps.keys import Key, KeyId
from ps.local import Handler
from ps.mailbox import Mailbox, MailboxError, MailboxMissing
from ps.optimizer import OptimizerConfig
from ps.packed import Packed
from ps.store import (
    BadRequest,
    Closed,
    LayoutConflict,
    NotInitialised,
    PushResult,
    StepOutOfRange,
    Store,
    StoreError,
    UnknownKey,
    WaitTimeout,
)
from ps.wire import WIRE_DTYPES, WireError, decode_slice, raw_slice

__all__ = ["SERVICE_NAME", "ParameterServerServicer", "add_to_server", "local_handlers"]

SERVICE_NAME = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name

_STATUS = {
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    MailboxError: grpc.StatusCode.INVALID_ARGUMENT,
    MailboxMissing: grpc.StatusCode.FAILED_PRECONDITION,
    NotInitialised: grpc.StatusCode.FAILED_PRECONDITION,
    LayoutConflict: grpc.StatusCode.FAILED_PRECONDITION,
    StepOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Closed: grpc.StatusCode.UNAVAILABLE,
}

# A pull waits for a barrier at most this long when the caller set no deadline.
_DEFAULT_WAIT_S = 60.0


def _wait_budget(context: grpc.ServicerContext) -> float:
    """Seconds a handler may block: a little less than the caller's deadline, so that the
    caller hears DEADLINE_EXCEEDED with our message rather than its own timeout."""
    remaining = context.time_remaining()
    if remaining is None:
        return _DEFAULT_WAIT_S
    return max(0.0, min(remaining - 0.05, _DEFAULT_WAIT_S * 10))


def _wire_dtype(name: str) -> str:
    if name not in WIRE_DTYPES:
        raise WireError(f"dtype {name!r} is not one of {', '.join(WIRE_DTYPES)}")
    return name


def _key(spec: ps_pb2.KeySpec) -> Key:
    return Key(spec.name, tuple(spec.tensor_shape), spec.start, spec.stop)


def _key_spec(key: Key) -> ps_pb2.KeySpec:
    return ps_pb2.KeySpec(name=key.name, tensor_shape=key.tensor_shape, start=key.start,
                          stop=key.stop)


def _optimizer(settings: ps_pb2.OptimizerSettings) -> OptimizerConfig:
    try:
        return OptimizerConfig(
            name=settings.name, lr=settings.lr, momentum=settings.momentum,
            nesterov=settings.nesterov, beta1=settings.beta1, beta2=settings.beta2,
            eps=settings.eps, weight_decay=settings.weight_decay,
        )
    except ValueError as err:
        raise BadRequest(f"init: {err}") from None


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, store: Store, on_shutdown: Callable[[], None],
                 extra_stats: Callable[[], dict] = dict) -> None:
        self._store = store
        self._on_shutdown = on_shutdown
        self._extra_stats = extra_stats  # counters kept outside the store (checkpoints)
        self._lock = threading.Lock()
        self._bytes_in = 0  # message bytes of the pushes taken (Init not counted)
        self._bytes_out = 0  # message bytes of the pulls answered
        self._last_reply: tuple[tuple, bytes] | None = None  # see _encode
        self._rejected_pushes = 0  # pushes refused: malformed, non-finite, wrong step, ...
        self._mailboxes: dict[int, Mailbox] = {}  # worker -> its shared-memory mailbox
        self._key_sizes: tuple[tuple[Key, ...] | None, dict[KeyId, int]] = (None, {})
        self._local_channel: tuple[str, bytes] | None = None  # see offer_local

    def offer_local(self, name: str, key: bytes) -> None:
        """Tell workers that attach a mailbox of this server's local channel (ps/local.py)."""
        self._local_channel = (name, key)

    def _encode(self, got: list[tuple[Key, np.ndarray, int]], dtype: str = "float32",
                staleness: int = 0, skipped: bool = False) -> bytes:
        """PullReply bytes for (key, values, version) triples; runs under the store's lock.

        The last reply is kept: in sync mode all W workers ask for the same keys at the same
        versions, and the keys and versions say exactly what the bytes hold, so W-1 of them
        get it without encoding again.
        """
        signature = (tuple((k.name, k.start, version) for k, _, version in got), dtype,
                     staleness, skipped)
        if self._last_reply is not None and self._last_reply[0] == signature:
            return self._last_reply[1]
        payload = encode_pull_reply(
            [(k.name, k.start, values, version) for k, values, version in got], staleness,
            skipped, dtype)
        self._last_reply = (signature, payload)
        return payload

    def _write_shared(self, got: list[tuple[Key, np.ndarray, int]], dtype: str,
                      mailbox: Mailbox, offsets: dict[KeyId, int], staleness: int = 0,
                      skipped: bool = False) -> bytes:
        """Copy the values into the worker's mailbox and answer where they are; runs under the
        store's lock, so the values and versions are one consistent snapshot."""
        items, where, moved = [], [], 0
        for k, values, version in got:
            offset = offsets[(k.name, k.start)]
            raw = pack(values, dtype, mailbox.weights(offset, WIRE_DTYPES[dtype], values.size))
            items.append((k.name, k.start, values, version))
            where.append(offset)
            moved += raw.nbytes
        self._count(sent=moved)
        return encode_pull_reply(items, staleness, skipped, dtype, where)

    def _mailbox(self, worker: int, name: str) -> Mailbox:
        with self._lock:
            mailbox = self._mailboxes.get(worker)
        if mailbox is None or mailbox.name != name:
            raise MailboxMissing(f"worker {worker} has no mailbox {name} on this server: "
                                 "attach first")
        return mailbox

    def _check_room(self, mailbox: Mailbox, offsets: dict[KeyId, int]) -> None:
        """Every key's float32 values fit in the mailbox at its offset: checked before
        anything is taken or written, so that a refused request changes nothing."""
        layout = self._store.layout()
        if self._key_sizes[0] is not layout:  # the layout changes only at init or restore
            self._key_sizes = (layout, {k.id: k.size for k in layout})
        sizes = self._key_sizes[1]
        for key_id, offset in offsets.items():
            if key_id in sizes:  # an unknown key: the store says so
                mailbox.weights(offset, np.float32, sizes[key_id])  # raises if outside

    def _count(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self._bytes_in += received
            self._bytes_out += sent

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], object]):
        try:
            return fn()
        except (StoreError, WireError, CodecError, MailboxError, MailboxMissing) as err:
            context.abort(_STATUS[type(err)], str(err))

    def Init(self, request, context):
        def run():
            keys = [_key(spec) for spec in request.keys]
            values = {(s.name, s.start): decode_slice(s) for s in request.values}
            created, pending = self._store.init(keys, _optimizer(request.optimizer), values)
            return ps_pb2.InitReply(created=created, keys_pending=pending)

        return self._call(context, run)

    def Pull(self, request, context):
        """Answers PullReply bytes, written by ps.codec (see add_to_server)."""
        def run():
            key_ids = [(k.name, k.start) for k in request.keys] or None
            dtype = _wire_dtype(request.dtype or "float32")
            if request.mailbox:
                mailbox = self._mailbox(request.worker, request.mailbox)
                offsets = self._pull_offsets(request, mailbox)
                def read(got):
                    return self._write_shared(got, dtype, mailbox, offsets)
            else:
                def read(got):
                    return self._encode(got, dtype)
            # On the wire a negative step asks for the values at once; the store says None.
            step = request.step if request.step >= 0 else None
            payload = self._store.pull(key_ids, request.worker, step, _wait_budget(context),
                                       read=read)
            self._count(sent=len(payload))
            return payload

        return self._call(context, run)

    def _pull_offsets(self, request: ps_pb2.PullRequest, mailbox: Mailbox) -> dict[KeyId, int]:
        """Where a shared pull wants each key's values."""
        if not request.keys:
            raise BadRequest("a shared pull must name its keys and their mailbox offsets")
        offsets = {(ref.name, ref.start): ref.offset for ref in request.keys}
        self._check_room(mailbox, offsets)
        return offsets

    def _push(self, request: bytes) -> tuple[PushRequestView, PushResult, list[KeyId]]:
        """Decode PushRequest bytes (in place) and hand the gradients to the store."""
        try:
            push = decode_push_request(request)
            received = len(request)
            mailbox = None
            if push.mailbox:
                mailbox = self._mailbox(push.worker, push.mailbox)
                self._check_room(mailbox, {(s.name, s.start): s.offset for s in push.slices})
            grads = {}
            for s in push.slices:
                if (s.name, s.start) in grads:
                    raise BadRequest(f"push: {s.name!r} at {s.start} appears twice")
                if mailbox is not None:
                    s = _from_mailbox(mailbox, s)
                    received += len(s.data)
                # 16-bit gradients go to the store as their codes: it decodes them only
                # where the update cannot read codes itself.
                raw = raw_slice(s)
                grads[(s.name, s.start)] = (raw if s.dtype == "float32" else Packed(raw, s.dtype),
                                            s.version)
            # Gradients copied out of a mailbox are private arrays: the store may keep them.
            result = self._store.push(push.worker, push.step, grads, push.grad_scale, push.skip,
                                      owned=mailbox is not None)
        except (StoreError, WireError, CodecError, MailboxError, MailboxMissing):
            with self._lock:
                self._rejected_pushes += 1
            raise
        self._count(received=received)
        return push, result, list(grads)

    def Push(self, request: bytes, context):
        """Takes PushRequest bytes, read in place by ps.codec (see add_to_server)."""
        def run():
            _, result, _ = self._push(request)
            return ps_pb2.PushReply(accepted=result.accepted, duplicates=result.duplicates,
                                    staleness_max=result.staleness_max)

        return self._call(context, run)

    def PushPull(self, request: bytes, context):
        """Push, then pull the same keys for the next step: PullReply bytes (ps.codec)."""
        def run():
            push, (_, _, staleness), key_ids = self._push(request)
            # The weights go back in the format the gradients came in.
            dtype = _wire_dtype(push.slices[0].dtype if push.slices else "float32")

            # Runs under the store's lock, after the barrier: the skip decision is made.
            def read(got):
                skipped = self._store.was_skipped(push.worker, push.step)
                if not push.mailbox:
                    return self._encode(got, dtype, staleness, skipped)
                # The weights go where the gradients were, in the mailbox's other half.
                offsets = {(s.name, s.start): s.offset for s in push.slices}
                return self._write_shared(got, dtype, self._mailbox(push.worker, push.mailbox),
                                          offsets, staleness, skipped)

            payload = self._store.pull(key_ids, push.worker, push.step + 1,
                                       _wait_budget(context), read=read)
            self._count(sent=len(payload))
            return payload

        return self._call(context, run)

    def Layout(self, request, context):
        return ps_pb2.LayoutReply(keys=[_key_spec(k) for k in self._store.layout()])

    def Version(self, request, context):
        def run():
            initialised, vmin, vmax, clocks = self._store.versions()
            start = self._store.start_step(request.worker) if initialised else 0
            return ps_pb2.VersionReply(initialised=initialised, min_version=vmin,
                                       max_version=vmax, clocks=clocks, start_step=start)

        return self._call(context, run)

    def Leave(self, request, context):
        return self._call(context, lambda: ps_pb2.LeaveReply(
            removed=self._store.remove_worker(request.worker)))

    def Stats(self, request, context):
        stats = self._store.stats()
        stats.pop("initialised")
        with self._lock:
            stats.update(bytes_in=self._bytes_in, bytes_out=self._bytes_out,
                         rejected_pushes=self._rejected_pushes)
        stats.update(self._extra_stats())
        return ps_pb2.StatsReply(**stats)

    def Attach(self, request, context):
        """Map a worker's shared-memory mailbox (see ps/mailbox.py); a newer one replaces it."""
        def run():
            if not 0 <= request.worker < self._store.config.workers:
                raise BadRequest(f"attach: worker {request.worker} is not one of the "
                                 f"{self._store.config.workers} workers")
            mailbox = Mailbox.open(request.name, request.size)
            with self._lock:
                # A replaced mailbox is unmapped once no request is still using it.
                self._mailboxes[request.worker] = mailbox
            # A worker that can map our files is on our host: it may use the local channel.
            name, key = self._local_channel or ("", b"")
            return ps_pb2.AttachReply(channel=name, channel_key=key)

        return self._call(context, run)

    def Shutdown(self, request, context):
        self._on_shutdown()
        return ps_pb2.ShutdownReply()


def _from_mailbox(mailbox: Mailbox, piece: WireSlice) -> WireSlice:
    """The slice with its data copied out of the worker's mailbox: the worker may write there
    at any time, so the store must check and keep a private copy."""
    dtype = WIRE_DTYPES.get(piece.dtype)
    if dtype is None or any(d < 0 for d in piece.shape):
        return piece  # raw_slice says what is wrong with it
    raw = mailbox.gradients(piece.offset, dtype, math.prod(piece.shape)).copy()
    return replace(piece, data=memoryview(raw).cast("B"))


def _parsing(method: Callable, request_type) -> Callable:
    """Parse the request bytes inside the handler, so that a malformed message is answered
    INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL, the mark of a bug)."""
    def parse_then_call(payload: bytes, context: grpc.ServicerContext):
        try:
            request = request_type.FromString(payload)
        except DecodeError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed {request_type.DESCRIPTOR.name}: {err}")
        return method(request, context)

    return parse_then_call


def local_handlers(servicer: ParameterServerServicer) -> dict[str, Handler]:
    """The tensor calls as a local channel (ps/local.py) takes them: the methods that gRPC
    calls, request bytes in and reply bytes out."""
    def push(payload: bytes, context) -> bytes:
        return servicer.Push(payload, context).SerializeToString()

    return {"Pull": _parsing(servicer.Pull, ps_pb2.PullRequest), "Push": push,
            "PushPull": servicer.PushPull}


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register the service. As the generated add_ParameterServerServicer_to_server, except
    that Pull replies and Push requests go through ps.codec rather than protobuf objects:
    the same bytes on the wire, a fraction of the copies."""
    def handler(method, request_type, reply_type, raw_request=False, raw_reply=False):
        if not raw_request:
            method = _parsing(method, request_type)
        return grpc.unary_unary_rpc_method_handler(
            method, response_serializer=None if raw_reply else reply_type.SerializeToString)

    pb = ps_pb2
    handlers = {
        "Init": handler(servicer.Init, pb.InitRequest, pb.InitReply),
        "Pull": handler(servicer.Pull, pb.PullRequest, pb.PullReply, raw_reply=True),
        "Push": handler(servicer.Push, pb.PushRequest, pb.PushReply, raw_request=True),
        "PushPull": handler(servicer.PushPull, pb.PushRequest, pb.PullReply, raw_request=True,
                            raw_reply=True),
        "Layout": handler(servicer.Layout, pb.LayoutRequest, pb.LayoutReply),
        "Version": handler(servicer.Version, pb.VersionRequest, pb.VersionReply),
        "Stats": handler(servicer.Stats, pb.StatsRequest, pb.StatsReply),
        "Leave": handler(servicer.Leave, pb.LeaveRequest, pb.LeaveReply),
        "Attach": handler(servicer.Attach, pb.AttachRequest, pb.AttachReply),
        "Shutdown": handler(servicer.Shutdown, pb.ShutdownRequest, pb.ShutdownReply),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # Registered methods let gRPC's core match a call without asking Python (as the
    # generated code does): a cheaper dispatch for every call.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
