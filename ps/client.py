"""PSClient: the one way workers, notebooks and tests reach parameter servers.

It speaks ps-lite's verbs (init, pull, push) on whole named tensors and hides the placement:
it cuts tensors into keys, talks to every server in parallel with several chunks in flight,
puts a deadline on every call, and retries with backoff while a server is unavailable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from threading import Lock
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import ps_pb2, ps_pb2_grpc
from ps.codec import PullReplyView, decode_pull_reply, encode_push_request, pack
from ps.keys import DEFAULT_CHUNK_BYTES, Key, KeyId, cut
from ps.local import LocalChannel, LocalError, LocalUnavailable
from ps.mailbox import Mailbox
from ps.optimizer import OptimizerConfig
from ps.placement import Placement, TensorSpec, place
from ps.security import TLSFiles, channel_credentials
from ps.wire import MAX_MESSAGE_BYTES, WIRE_DTYPES, decode_slice, unpack, write_slice

__all__ = ["PSClient", "PSError", "PushPullResult", "PushResult", "wait_healthy"]

# Statuses that mean "the server is not there right now": wait and call again. CANCELLED is
# one: this client never cancels a call of its own, so a cancelled call is one that a
# stopping server received but never started (gRPC cancels those at shutdown).
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

T = TypeVar("T")


class PSError(RuntimeError):
    """A call a server refused or could not answer; names the server and the status."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{address}: {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details


@dataclass(frozen=True)
class PushPullResult:
    params: dict[str, np.ndarray]  # every tensor, for the next step
    staleness_max: int  # the stalest gradient this push had applied
    step_skipped: bool  # the step was skipped for inf/NaN (sync: by any worker)


@dataclass(frozen=True)
class PushResult:
    accepted: int  # keys taken for this step, over all servers
    duplicates: int  # keys already pushed for this step (a retry): acknowledged, not applied
    staleness_max: int  # async/ssp: the stalest gradient applied by this push


def _reply_dict(msg) -> dict:
    """A reply message as plain Python values (repeated -> list, map -> dict)."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = dict(value)
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def _channel(address: str, options: list, tls: TLSFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


def wait_healthy(addresses: Sequence[str], timeout: float,
                 tls: TLSFiles | None = None) -> list[str]:
    """Ask each server's standard gRPC health service, waiting up to `timeout` s for it to
    come up; return the addresses that are not SERVING (empty: all are)."""
    bad = []
    for address in addresses:
        with _channel(address, [], tls) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                    wait_for_ready=True)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    bad.append(address)
            except grpc.RpcError:
                bad.append(address)
    return bad


def _lost_mailbox(err: PSError) -> bool:
    """The server has no mailbox of ours: it restarted since we attached."""
    return err.code == grpc.StatusCode.FAILED_PRECONDITION and "no mailbox" in err.details


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


class PSClient:
    """A client of the servers at `addresses` (server i is addresses[i]), as worker `worker_id`."""

    def __init__(
        self,
        addresses: Sequence[str],
        worker_id: int = 0,
        token: str | None = None,
        tls: TLSFiles | None = None,
        deadline_s: float = 30.0,
        *,
        wait_s: float = 300.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        in_flight: int = 4,
        retry_s: float = 30.0,
        wire_dtype: str = "float32",
        shared_memory: bool = False,
    ) -> None:
        addresses = list(addresses)
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        if deadline_s <= 0 or wait_s <= 0:
            raise ValueError(f"deadlines must be > 0, got deadline_s={deadline_s}, "
                             f"wait_s={wait_s}")
        if not 4 <= chunk_bytes <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(f"chunk_bytes must be in [4, {MAX_MESSAGE_BYTES // 2}], "
                             f"got {chunk_bytes}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, "
                             f"got {wire_dtype!r}")
        self.wire_dtype = wire_dtype  # weights are pulled and gradients pushed in this format
        # Tensors go through a shared-memory mailbox to each server that can map it (one on
        # this host; see ps/mailbox.py), and in the messages to the others. Never with TLS:
        # who asks for TLS asks for every byte to be on the encrypted channel.
        self.shared_memory = shared_memory and tls is None
        self._mailboxes: dict[int, Mailbox | None] = {}  # server -> mailbox, None: bytes
        # server -> its local channel (ps/local.py), which came with the mailbox's Attach
        self._locals: dict[int, LocalChannel] = {}
        self._mailbox_lock = Lock()  # chunks in flight to one server attach one mailbox
        self._offsets: dict[KeyId, int] = {}  # key -> its byte offset in its server's mailbox
        self.addresses = addresses
        self.worker_id = worker_id
        self.deadline_s = deadline_s  # every call but a waiting pull
        self.wait_s = wait_s  # a pull that waits on a barrier or the staleness bound
        self.retry_s = retry_s  # how long to keep retrying an unavailable server
        self.chunk_bytes = chunk_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # A restarted server is back within seconds: reconnect soon after, rather
                   # than after gRPC's default backoff, which grows towards two minutes.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channels = [_channel(a, options, tls) for a in addresses]
        self._stubs = [_methods(c) for c in self._channels]
        self._pool = ThreadPoolExecutor(max_workers=len(addresses) * in_flight,
                                        thread_name_prefix="psclient")
        self.placement: Placement | None = None
        self._keys: dict[int, list[Key]] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._read_versions: dict[KeyId, int] = {}  # version of each key at our last pull

    # -- calls ----------------------------------------------------------------------------

    def _call(self, server: int, method: str, request, timeout: float):
        """One unary call with a deadline, retried with backoff while the server is down."""
        rpc = self._stubs[server][method]
        delay, give_up = 0.05, time.monotonic() + self.retry_s
        while True:
            try:
                return rpc(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() in _RETRYABLE and time.monotonic() + delay < give_up:
                    time.sleep(delay)  # backoff before a retry, not synchronisation
                    delay = min(2 * delay, 1.0)
                    continue
                raise PSError(self.addresses[server], err.code(), err.details()) from None

    def _run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Run tasks on the client's threads in parallel (inline if one); results in order."""
        if len(tasks) == 1:
            return [tasks[0]()]
        futures = [self._pool.submit(task) for task in tasks]
        return [f.result() for f in futures]

    def _call_all(self, calls: list[tuple[int, str, object, float]]) -> list:
        """Run calls (server, method, request, timeout) in parallel; replies in call order."""
        return self._run([partial(self._call, *c) for c in calls])

    def _groups(self, keys: dict[int, list[Key]]) -> list[tuple[int, list[Key]]]:
        """(server, keys) of every request: each server's keys in groups of at most
        chunk_bytes, the servers taking turns so that each has requests in flight at once."""
        per_server = []
        for server, server_keys in keys.items():
            groups, group, size = [], [], 0
            for key in server_keys:
                if group and size + 4 * key.size > self.chunk_bytes:
                    groups.append(group)
                    group, size = [], 0
                group.append(key)
                size += 4 * key.size
            if group:
                groups.append(group)
            per_server.append([(server, g) for g in groups])
        return [item for turn in zip_longest(*per_server) for item in turn if item]

    # -- layout ---------------------------------------------------------------------------

    def _layout(self) -> dict[int, list[Key]]:
        """This client's keys, from its own init or else from the servers' layouts."""
        if self._keys is None:
            replies = self._call_all([(s, "Layout", ps_pb2.LayoutRequest(), self.deadline_s)
                                      for s in range(len(self._stubs))])
            keys = {s: [Key(k.name, tuple(k.tensor_shape), k.start, k.stop) for k in r.keys]
                    for s, r in enumerate(replies)}
            if not any(keys.values()):
                raise RuntimeError("the servers hold no parameters yet: call init() first")
            self._set_keys(keys)
        return self._keys

    def _set_keys(self, keys: dict[int, list[Key]]) -> None:
        self._keys = keys
        self._shapes = {k.name: k.tensor_shape for ks in keys.values() for k in ks}
        # Each key has the room of its float32 values in its server's mailbox, whatever the
        # wire format, so that one mailbox serves every format.
        self._offsets = {}
        for server_keys in keys.values():
            offset = 0
            for k in server_keys:
                self._offsets[k.id] = offset
                offset += 4 * k.size
        self._drop_mailboxes()

    # -- shared-memory mailboxes ----------------------------------------------------------

    def _mailbox(self, server: int) -> Mailbox | None:
        """This client's mailbox on `server`, attached on first use; None: send bytes."""
        if not self.shared_memory:
            return None
        with self._mailbox_lock:
            if server not in self._mailboxes:
                self._mailboxes[server] = self._attach(server)
            return self._mailboxes[server]

    def _attach(self, server: int) -> Mailbox | None:
        """A new mailbox, mapped by `server`, and the server's local channel if it offers
        one; None if it cannot map it. A channel that came with an older mailbox goes."""
        self._forget_local(server)
        mailbox = Mailbox.create(max(4 * sum(k.size for k in self._keys[server]), 4))
        try:
            reply = self._call(server, "Attach", ps_pb2.AttachRequest(
                worker=self.worker_id, name=mailbox.name, size=mailbox.size), self.deadline_s)
        except PSError as err:
            mailbox.unlink()
            mailbox.close()
            if err.code not in (grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.UNIMPLEMENTED):
                raise
            return None  # the server cannot map it (another host): bytes it is
        mailbox.unlink()  # both have it mapped: the name is no longer needed
        if reply.channel:
            self._locals[server] = LocalChannel(reply.channel, reply.channel_key,
                                                guard_s=max(self.wait_s, self.deadline_s) + 5)
        return mailbox

    def _forget_local(self, server: int, channel: LocalChannel | None = None) -> None:
        """Stop using `server`'s local channel (only `channel`, if given: not a newer one)."""
        current = self._locals.get(server)
        if current is not None and (channel is None or current is channel):
            del self._locals[server]
            current.close()

    def _drop_mailboxes(self) -> None:
        for mailbox in self._mailboxes.values():
            if mailbox is not None:
                mailbox.close()
        self._mailboxes = {}
        for server in list(self._locals):
            self._forget_local(server)

    def _send(self, server: int, method: str, request, timeout: float,
              mailbox: Mailbox | None):
        """A tensor call: over the server's local channel if it came with this mailbox, else
        through gRPC. A channel that is gone (the server stopped or restarted) is dropped,
        and gRPC retries until the server is back."""
        channel = self._locals.get(server) if mailbox is not None else None
        if channel is not None:
            payload = request if isinstance(request, bytes) else request.SerializeToString()
            try:
                reply = channel.call(method, payload, timeout)
            except LocalUnavailable:
                with self._mailbox_lock:
                    self._forget_local(server, channel)
            except LocalError as err:
                raise PSError(self.addresses[server], err.code, err.details) from None
            else:
                return ps_pb2.PushReply.FromString(reply) if method == "Push" else reply
        return self._call(server, method, request, timeout)

    def _tensor_call(self, server: int, method: str, build: Callable[[Mailbox | None], object],
                     timeout: float) -> tuple[object, Mailbox | None]:
        """A call that carries tensors, through the server's mailbox if it has one: (reply,
        mailbox). A server that restarted has lost the mailbox: attach again, call again."""
        mailbox = self._mailbox(server)
        try:
            return self._send(server, method, build(mailbox), timeout, mailbox), mailbox
        except PSError as err:
            if mailbox is None or not _lost_mailbox(err):
                raise
        with self._mailbox_lock:
            if self._mailboxes.get(server) is mailbox:  # no other thread has replaced it yet
                del self._mailboxes[server]
                mailbox.close()
        mailbox = self._mailbox(server)  # attaching again also drops the old local channel
        return self._send(server, method, build(mailbox), timeout, mailbox), mailbox

    # -- the verbs ------------------------------------------------------------------------

    def init(
        self,
        params: Mapping[str, np.ndarray],
        optimizer: str = "sgd",
        *,
        placement: str = "round_robin",
        split_bytes: int | None = None,
        **settings,
    ) -> Placement:
        """Place `params` on the servers and give them their first values and the optimizer.

        Any worker may call it: the first initialisation wins, a repeat with the same layout
        is accepted (the values already there stay), one with other shapes is refused.
        `settings` are OptimizerConfig fields (lr, momentum, beta1, ...).
        """
        config = OptimizerConfig(name=optimizer, **settings)
        arrays = {}
        for name, value in params.items():
            value = np.asarray(value)
            if value.dtype != np.float32:
                raise TypeError(f"params[{name!r}] must be float32, got {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"params[{name!r}] holds inf or NaN")
            arrays[name] = np.ascontiguousarray(value).reshape(-1)
        specs = [TensorSpec(name, np.shape(params[name])) for name in arrays]
        layout = place(specs, len(self._stubs), placement, split_bytes)
        keys = cut(layout, self.chunk_bytes)
        settings_msg = ps_pb2.OptimizerSettings(
            name=config.name, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            beta1=config.beta1, beta2=config.beta2, eps=config.eps,
            weight_decay=config.weight_decay)

        def request(server: int, group: list[Key]) -> ps_pb2.InitRequest:
            msg = ps_pb2.InitRequest()
            msg.optimizer.CopyFrom(settings_msg)
            for k in keys[server]:
                msg.keys.add(name=k.name, tensor_shape=k.tensor_shape, start=k.start,
                             stop=k.stop)
            for k in group:
                write_slice(msg.values.add(), k.name, k.start, arrays[k.name][k.start:k.stop])
            return msg

        groups = self._groups(keys)
        first = {}
        for server, group in groups:
            first.setdefault(server, group)
        # The first request of each server sets its layout; the rest may then run in parallel.
        self._call_all([(s, "Init", request(s, g), self.deadline_s) for s, g in first.items()])
        self._call_all([(s, "Init", request(s, g), self.deadline_s) for s, g in groups
                        if g is not first[s]])
        self.placement = layout
        self._set_keys(keys)
        return layout

    def pull(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Every tensor, whole. `step`: the step this worker is about to compute (sync and ssp
        wait until the servers allow it); None: the newest weights at once."""
        keys = self._layout()
        wire_step = -1 if step is None else step
        timeout = self.deadline_s if step is None else self.wait_s
        flat = self._empty()

        def fetch(server: int, group: list[Key]) -> PullReplyView:
            def request(mailbox: Mailbox | None) -> ps_pb2.PullRequest:
                refs = [ps_pb2.KeyRef(name=k.name, start=k.start, offset=self._offsets[k.id])
                        for k in group]
                return ps_pb2.PullRequest(worker=self.worker_id, step=wire_step, keys=refs,
                                          dtype=self.wire_dtype,
                                          mailbox="" if mailbox is None else mailbox.name)
            return self._unpack(*self._tensor_call(server, "Pull", request, timeout), flat)

        self._finish(self._run([partial(fetch, s, g) for s, g in self._groups(keys)]))
        return self._shaped(flat)

    def push(self, grads: Mapping[str, np.ndarray] | None, step: int, *, scale: float = 1.0,
             skip: bool = False) -> PushResult:
        """Send this worker's gradients of `step` (every tensor) to the servers that hold them.

        scale: the gradients carry this loss scale; servers divide it out in fp32.
        skip: this worker found inf or NaN; grads may be None, the step counts, nothing is
        applied. A repeat of a step already pushed is acknowledged and not applied again.
        """
        keys = self._layout()
        flat = None if skip else self._flatten("push", grads)

        def send(server: int, group: list[Key]) -> ps_pb2.PushReply:
            def payload(mailbox: Mailbox | None) -> bytes:
                return self._encode(step, group, flat, scale, mailbox)
            return self._tensor_call(server, "Push", payload, self.deadline_s)[0]

        replies = self._run([partial(send, s, g) for s, g in self._groups(keys)])
        return PushResult(
            accepted=sum(r.accepted for r in replies),
            duplicates=sum(r.duplicates for r in replies),
            staleness_max=max((r.staleness_max for r in replies), default=0),
        )

    def push_pull(self, grads: Mapping[str, np.ndarray] | None, step: int, *,
                  scale: float = 1.0, skip: bool = False) -> PushPullResult:
        """push(grads, step), then pull(step + 1), in one round trip per request (ps-lite's
        PushPull): the next step's weights, the stalest gradient applied, and whether the step
        was skipped (sync: by any worker, so that every worker's loss scaler hears of it)."""
        keys = self._layout()
        grads_flat = None if skip else self._flatten("push_pull", grads)
        flat = self._empty()

        def exchange(server: int, group: list[Key]) -> PullReplyView:
            def payload(mailbox: Mailbox | None) -> bytes:
                return self._encode(step, group, grads_flat, scale, mailbox)
            return self._unpack(*self._tensor_call(server, "PushPull", payload, self.wait_s),
                                flat)

        replies = self._run([partial(exchange, s, g) for s, g in self._groups(keys)])
        self._finish(replies)
        return PushPullResult(self._shaped(flat),
                              max((r.staleness_max for r in replies), default=0),
                              any(r.step_skipped for r in replies))

    # -- helpers of the verbs -------------------------------------------------------------

    def _empty(self) -> dict[str, np.ndarray]:
        return {name: np.empty(math.prod(shape), np.float32)
                for name, shape in self._shapes.items()}

    def _shaped(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: flat[name].reshape(shape) for name, shape in self._shapes.items()}

    def _flatten(self, verb: str, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked, flat float32 views of a full set of gradients (no copy when possible)."""
        missing = sorted(set(self._shapes) - set(grads))
        extra = sorted(set(grads) - set(self._shapes))
        if missing or extra:
            raise ValueError(f"{verb}: gradients must cover exactly the model's tensors; "
                             f"missing {missing}, unknown {extra}")
        flat = {}
        for name, shape in self._shapes.items():
            grad = np.asarray(grads[name])
            if grad.shape != shape or grad.dtype != np.float32:
                raise ValueError(f"{verb}: {name!r} must be float32 {shape}, got "
                                 f"{grad.dtype} {grad.shape}")
            flat[name] = np.ascontiguousarray(grad).reshape(-1)
        return flat

    def _encode(self, step: int, group: list[Key], flat: dict[str, np.ndarray] | None,
                scale: float, mailbox: Mailbox | None = None) -> bytes:
        """PushRequest bytes for a group of keys (flat None: a skipped step, no values); with
        a mailbox, the values go there and the message says where. Called on the thread
        that sends them, so that the copy overlaps other calls."""
        empty = np.zeros(0, np.float32)
        items = [(k.name, k.start, empty if flat is None else flat[k.name][k.start:k.stop],
                  self._read_versions.get(k.id, 0)) for k in group]
        offsets = None
        if mailbox is not None:
            offsets = [self._offsets[k.id] for k in group]
            wire_type = WIRE_DTYPES[self.wire_dtype]
            for (_, _, values, _), offset in zip(items, offsets, strict=True):
                pack(values, self.wire_dtype, mailbox.gradients(offset, wire_type, values.size))
        return encode_push_request(self.worker_id, step, items, self.wire_dtype,
                                   0.0 if scale == 1.0 else scale, flat is None, offsets,
                                   "" if mailbox is None else mailbox.name)

    @staticmethod
    def _unpack(reply: bytes, mailbox: Mailbox | None,
                flat: dict[str, np.ndarray]) -> PullReplyView:
        """Copy PullReply values (from the reply, or from the mailbox if it says they are
        there) into `flat` and return the reply. Called on the receiving thread: NumPy
        releases the interpreter lock while it copies, so copies overlap the calls still on
        the wire."""
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
            flat[piece.name][piece.start:piece.start + values.size] = values
        return view

    def _finish(self, replies: list[PullReplyView]) -> None:
        """Remember the versions read: the next push reports them, for staleness."""
        for reply in replies:
            self._read_versions.update(((p.name, p.start), p.version) for p in reply.slices)

    def versions(self) -> list[dict]:
        """Per server: initialised, min_version, max_version, clocks (worker -> steps),
        start_step (where this worker would start; see start_step)."""
        request = ps_pb2.VersionRequest(worker=self.worker_id)
        replies = self._call_all([(s, "Version", request, self.deadline_s)
                                  for s in range(len(self._stubs))])
        return [_reply_dict(r) for r in replies]

    def start_step(self) -> int:
        """The step this worker starts at: 0 in a new run; after a restart or a resume, as
        far as the servers say (the furthest of them: a server behind skips ahead)."""
        return max(v["start_step"] for v in self.versions())

    def leave(self, worker: int) -> int:
        """Tell every server that `worker` is gone, so that no barrier waits for it;
        returns on how many servers it was live."""
        request = ps_pb2.LeaveRequest(worker=worker)
        replies = self._call_all([(s, "Leave", request, self.deadline_s)
                                  for s in range(len(self._stubs))])
        return sum(r.removed for r in replies)

    def stats(self) -> list[dict]:
        """Per server: its counters (see StatsReply in proto/ps.proto) and its address."""
        replies = self._call_all([(s, "Stats", ps_pb2.StatsRequest(), self.deadline_s)
                                  for s in range(len(self._stubs))])
        return [dict(_reply_dict(r), index=i, address=self.addresses[i])
                for i, r in enumerate(replies)]

    def shutdown(self) -> None:
        """Ask every server to stop."""
        self._call_all([(s, "Shutdown", ps_pb2.ShutdownRequest(), self.deadline_s)
                        for s in range(len(self._stubs))])

    def close(self) -> None:
        self._drop_mailboxes()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
