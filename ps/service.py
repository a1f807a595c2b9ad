"""The gRPC servicer: translates ParameterServer messages to store calls and back.

It validates and decodes, calls the store, builds the reply. It holds no training logic;
store errors map to gRPC status codes in one table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from ps import ps_pb2, ps_pb2_grpc
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.store import (
    BadRequest,
    Closed,
    LayoutConflict,
    NotInitialised,
    StepOutOfRange,
    Store,
    StoreError,
    UnknownKey,
    WaitTimeout,
)
from ps.wire import WireError, decode_slice, write_slice

__all__ = ["ParameterServerServicer"]

_STATUS = {
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
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
    def __init__(self, store: Store, on_shutdown: Callable[[], None]) -> None:
        self._store = store
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()
        self._bytes_in = 0  # payload bytes received in Init and Push
        self._bytes_out = 0  # payload bytes sent in Pull

    def _count(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self._bytes_in += received
            self._bytes_out += sent

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], object]):
        try:
            return fn()
        except (StoreError, WireError) as err:
            context.abort(_STATUS[type(err)], str(err))

    def Init(self, request, context):
        def run():
            keys = [_key(spec) for spec in request.keys]
            values = {(s.name, s.start): decode_slice(s) for s in request.values}
            created, pending = self._store.init(keys, _optimizer(request.optimizer), values)
            self._count(received=sum(v.nbytes for v in values.values()))
            return ps_pb2.InitReply(created=created, keys_pending=pending)

        return self._call(context, run)

    def Pull(self, request, context):
        def run():
            key_ids = [(k.name, k.start) for k in request.keys] or None
            got = self._store.pull(key_ids, request.worker, request.step, _wait_budget(context))
            reply = ps_pb2.PullReply()
            for key, values, version in got:
                write_slice(reply.values.add(), key.name, key.start, values, version)
            self._count(sent=4 * sum(values.size for _, values, _ in got))
            return reply

        return self._call(context, run)

    def Push(self, request, context):
        def run():
            grads = {}
            for s in request.grads:
                if (s.name, s.start) in grads:
                    raise BadRequest(f"push: {s.name!r} at {s.start} appears twice")
                grads[(s.name, s.start)] = (decode_slice(s), s.version)
            accepted, duplicates, staleness = self._store.push(
                request.worker, request.step, grads)
            self._count(received=sum(g.nbytes for g, _ in grads.values()))
            return ps_pb2.PushReply(accepted=accepted, duplicates=duplicates,
                                    staleness_max=staleness)

        return self._call(context, run)

    def Layout(self, request, context):
        return ps_pb2.LayoutReply(keys=[_key_spec(k) for k in self._store.layout()])

    def Version(self, request, context):
        initialised, vmin, vmax, clocks = self._store.versions()
        return ps_pb2.VersionReply(initialised=initialised, min_version=vmin,
                                   max_version=vmax, clocks=clocks)

    def Stats(self, request, context):
        stats = self._store.stats()
        stats.pop("initialised")
        with self._lock:
            stats.update(bytes_in=self._bytes_in, bytes_out=self._bytes_out)
        return ps_pb2.StatsReply(**stats)

    def Shutdown(self, request, context):
        self._on_shutdown()
        return ps_pb2.ShutdownReply()
