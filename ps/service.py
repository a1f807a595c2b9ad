"""The gRPC servicer: translates ParameterServer messages to store calls and back.

It validates and decodes, calls the store, builds the reply. It holds no training logic;
store errors map to gRPC status codes in one table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ps import ps_pb2, ps_pb2_grpc
from ps.codec import CodecError, ReplyPlan, decode_slice, write_pull_reply
from ps.inbox import Inbox, TensorRequest
from ps.keys import Key, KeyId
from ps.local import Handler
from ps.mailbox import REASON_KEY, MailboxError, MailboxLost, MailboxMissing
from ps.memory import filled_bytes
from ps.optimizer import OptimizerConfig
from ps.packed import Packed
from ps.store import PushResult, Store
from ps.store_errors import (
    BadRequest,
    Closed,
    LayoutConflict,
    NotInitialised,
    ResourceExhausted,
    StepOutOfRange,
    StoreError,
    UnknownKey,
    WaitTimeout,
)

__all__ = ["SERVICE_NAME", "ParameterServerServicer", "add_to_server", "local_handlers"]

SERVICE_NAME = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name

_STATUS = {
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    MailboxError: grpc.StatusCode.INVALID_ARGUMENT,
    MailboxMissing: grpc.StatusCode.FAILED_PRECONDITION,
    MailboxLost: grpc.StatusCode.FAILED_PRECONDITION,  # with its reason, see _call
    NotInitialised: grpc.StatusCode.FAILED_PRECONDITION,
    LayoutConflict: grpc.StatusCode.FAILED_PRECONDITION,
    StepOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the memory budget, or a
    # worker's calls waiting beyond its places (Store.waiting_room)
    WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Closed: grpc.StatusCode.UNAVAILABLE,
}
_REFUSALS = (StoreError, CodecError, MailboxError, MailboxMissing)

# A pull waits for a barrier at most this long when the caller set no deadline.
_DEFAULT_WAIT_S = 60.0


def _wait_budget(context: grpc.ServicerContext) -> float:
    """Seconds a handler may block: a little less than the caller's deadline, so that the
    caller hears DEADLINE_EXCEEDED with our message rather than its own timeout."""
    remaining = context.time_remaining()
    if remaining is None:
        return _DEFAULT_WAIT_S
    return max(0.0, min(remaining - 0.05, _DEFAULT_WAIT_S * 10))


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
            lr_schedule=settings.lr_schedule or None, planned_steps=settings.planned_steps or None,
        )
    except ValueError as err:
        raise BadRequest(f"init: {err}") from None


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, store: Store, on_shutdown: Callable[[], None],
                 extra_stats: Callable[[], dict] = dict) -> None:
        self._store = store
        self._on_shutdown = on_shutdown
        self._extra_stats = extra_stats  # counters kept outside the store (checkpoints)
        self._inbox = Inbox(store.layout)  # decodes Pull, Push, PushPull; holds the mailboxes
        self._lock = threading.Lock()
        self._bytes_in = 0  # bytes of the pushes taken, message and mailbox (not Init)
        self._bytes_out = 0  # bytes of the pulls answered, message and mailbox
        self._layout_ids: tuple[tuple[Key, ...] | None, dict[KeyId, Key]] = (None, {})
        self._rejected_pushes = 0  # pushes refused: malformed, non-finite, wrong step, ...
        self._local_channel: tuple[str, bytes] | None = None  # see offer_local

    def offer_local(self, name: str, key: bytes) -> None:
        """Tell workers that attach a mailbox of this server's local channel (ps/local.py)."""
        self._local_channel = (name, key)

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], object]):
        """fn(), or its refusal as a status code; a reason a program reads (a lost mailbox)
        travels beside it in the trailing metadata."""
        try:
            return fn()
        except _REFUSALS as err:
            reason = getattr(err, "reason", "")
            if reason:
                context.set_trailing_metadata(((REASON_KEY, reason),))
            context.abort(_STATUS[type(err)], str(err))

    def _count(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self._bytes_in += received
            self._bytes_out += sent

    # -- the store: each verb in one place --------------------------------------------------

    @contextmanager
    def _push_refusals(self) -> Iterator[None]:
        """Count a push that is refused: malformed, non-finite, the wrong step, ..."""
        try:
            yield
        except _REFUSALS:
            with self._lock:
                self._rejected_pushes += 1
            raise

    def _take(self, request: TensorRequest) -> PushResult:
        """Hand a decoded Push's or PushPull's gradients to the store: what it made of them."""
        # 16-bit gradients go to the store as their codes: it decodes them only where the
        # update cannot read codes itself.
        grads = {key_id: (raw if fmt == "float32" else Packed(raw, fmt), version)
                 for key_id, (raw, fmt, version) in request.grads.items()}
        result = self._store.push(request.worker, request.step, grads, request.scale,
                                  request.skip, owned=request.owned)
        self._count(received=request.received)
        return result

    def _give(self, request: TensorRequest, step: int | None, context: grpc.ServicerContext,
              staleness: int = 0, pushed: bool = False) -> bytes:
        """PullReply bytes of the request's keys once `step` may be read (None: at once), the
        weights in the reply or in the worker's mailbox. pushed: a PushPull's reply, which
        says whether its step was skipped (decided before the pull's barrier opened), and
        whose caller holds a waiting room for the pull."""
        if request.into is None:
            payload = self._reply_in_messages(request, step, context, staleness, pushed)
        else:
            payload = self._reply_in_mailbox(request, step, context, staleness, pushed)
        self._count(sent=len(payload) + request.shared_bytes)
        return payload

    def _reply_in_mailbox(self, request: TensorRequest, step: int | None,
                          context: grpc.ServicerContext, staleness: int, pushed: bool) -> bytes:
        """The store writes the weights into the worker's mailbox; the reply says where."""
        out = {key_id: view if request.dtype == "float32" else Packed(view, request.dtype)
               for key_id, (_, view) in request.into.items()}
        got = self._store.pull(request.keys, request.worker, step, _wait_budget(context),
                               out=out, admitted=pushed)
        skipped = pushed and self._store.was_skipped(request.worker, request.step)
        offsets = {key_id: offset for key_id, (offset, _) in request.into.items()}
        return write_pull_reply(got, request.dtype, staleness, skipped, offsets, got.blocked_s)

    def _reply_in_messages(self, request: TensorRequest, step: int | None,
                           context: grpc.ServicerContext, staleness: int, pushed: bool) -> bytes:
        """The store writes the weights straight into a new reply laid out for the keys'
        versions now (codec.ReplyPlan); a version that moved to another length since (rare)
        has the reply written again."""
        keys = self._keys(request.keys)
        # After a barrier for `step` a key is at version `step` or beyond (sync: exactly).
        expected = [max(v, step or 0) for v in self._store.key_versions(request.keys)]
        # A pull of a step may wait: the reply has room for how long (PullReply.blocked_s).
        plan = ReplyPlan(keys, request.dtype, expected, staleness, may_wait=step is not None)
        answer: dict = {}

        def fill(dest: np.ndarray) -> None:
            got = self._store.pull(request.keys, request.worker, step, _wait_budget(context),
                                   out=plan.destinations(dest), admitted=pushed)
            skipped = pushed and self._store.was_skipped(request.worker, request.step)
            if not plan.finish(dest, [version for _, _, version in got], skipped,
                               got.blocked_s):
                answer["again"] = (got, skipped)

        payload = filled_bytes(plan.size, fill)
        if "again" in answer:
            got, skipped = answer["again"]
            payload = write_pull_reply(got, request.dtype, staleness, skipped,
                                       blocked_s=got.blocked_s)
        return payload

    def _keys(self, key_ids: list[KeyId] | None) -> list[Key]:
        """The keys asked for (None: all), in the order the store answers; a key it does not
        hold is left out, and the store says so."""
        layout = self._store.layout()
        if self._layout_ids[0] is not layout:  # the layout changes only at init and restore
            self._layout_ids = (layout, {k.id: k for k in layout})
        by_id = self._layout_ids[1]
        return list(layout) if key_ids is None else [by_id[k] for k in key_ids if k in by_id]

    # -- the calls ------------------------------------------------------------------------

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
            pull = self._inbox.pull(request)
            return self._give(pull, pull.step, context)

        return self._call(context, run)

    def Push(self, request: bytes, context):
        """Takes PushRequest bytes, read in place by ps.codec (see add_to_server)."""
        def run():
            with self._push_refusals():
                result = self._take(self._inbox.push(request))
            return ps_pb2.PushReply(accepted=result.accepted, duplicates=result.duplicates,
                                    staleness_max=result.staleness_max)

        return self._call(context, run)

    def PushPull(self, request: bytes, context):
        """Push, then pull the same keys for the next step: PullReply bytes (ps.codec)."""
        def run():
            with ExitStack() as held:
                with self._push_refusals():
                    push = self._inbox.push(request)
                    # One waiting room (Store.waiting_room) for the push and the pull after
                    # it: a PushPull refused for want of one has applied nothing.
                    held.enter_context(self._store.waiting_room(push.worker))
                    result = self._take(push)
                return self._give(push, push.step + 1, context, result.staleness_max,
                                  pushed=True)

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
            self._inbox.attach(request.worker, request.name, request.size)
            # A worker that can map our files is on our host: it may use the local channel.
            name, key = self._local_channel or ("", b"")
            return ps_pb2.AttachReply(channel=name, channel_key=key)

        return self._call(context, run)

    def Shutdown(self, request, context):
        self._on_shutdown()
        return ps_pb2.ShutdownReply()


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
