"""PSClient: the one way workers, notebooks and tests reach parameter servers.

It speaks ps-lite's verbs (init, pull, push) on whole named tensors and hides the placement:
it cuts tensors into keys and talks to every server in parallel with several chunks in flight,
each server over its link (ps/link.py: plain gRPC, or the fast local link on this host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import ps_pb2
from ps.codec import MAX_MESSAGE_BYTES, WIRE_DTYPES, PullReplyView, write_slice
from ps.keys import DEFAULT_CHUNK_BYTES, Key, KeyId, cut
from ps.link import Gradients, GrpcLink, Link, PSError, open_channel
from ps.local_link import LocalLink
from ps.optimizer import OptimizerConfig
from ps.placement import Placement, TensorSpec, place
from ps.security import TLSFiles

__all__ = ["PSClient", "PSError", "PushPullResult", "PushResult", "wait_healthy"]

T = TypeVar("T")


@dataclass(frozen=True)
class PushPullResult:
    params: dict[str, np.ndarray]  # every tensor, for the next step
    staleness_max: int  # the stalest gradient this push had applied
    step_skipped: bool  # the step was skipped for inf/NaN (sync: by any worker)
    blocked_s: float = 0.0  # how long the servers held the pull half (see last_blocked_s)


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


def wait_healthy(addresses: Sequence[str], timeout: float,
                 tls: TLSFiles | None = None) -> list[str]:
    """Ask each server's standard gRPC health service, waiting up to `timeout` s for it to
    come up; return the addresses that are not SERVING (empty: all are)."""
    bad = []
    for address in addresses:
        with open_channel(address, tls) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout,
                    wait_for_ready=True)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    bad.append(address)
            except grpc.RpcError:
                bad.append(address)
    return bad


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
        wrap_link: Callable[[Link], Link] | None = None,
    ) -> None:
        addresses = list(addresses)
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        # Every wait has a deadline: infinity (or NaN) is not one.
        for name, value in (("deadline_s", deadline_s), ("wait_s", wait_s),
                            ("retry_s", retry_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
        if not 4 <= chunk_bytes <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(f"chunk_bytes must be in [4, {MAX_MESSAGE_BYTES // 2}], "
                             f"got {chunk_bytes}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, "
                             f"got {wire_dtype!r}")
        self.wire_dtype = wire_dtype  # weights are pulled and gradients pushed in this format
        # Tensors go through a shared-memory mailbox to each server that can map it (one on
        # this host; see ps/local_link.py), and in the messages to the others. Never with TLS:
        # who asks for TLS asks for every byte to be on the encrypted channel.
        self.shared_memory = shared_memory and tls is None
        self.addresses = addresses
        self.worker_id = worker_id
        self.deadline_s = deadline_s  # every call but a waiting pull
        self.wait_s = wait_s  # a pull that waits on a barrier or the staleness bound
        self.retry_s = retry_s  # how long to keep retrying an unavailable server
        self.chunk_bytes = chunk_bytes

        def link(address: str) -> Link:
            plain = GrpcLink(address, worker_id, token, tls, retry_s)
            if not self.shared_memory:
                return plain
            return LocalLink(plain, deadline_s, guard_s=max(wait_s, deadline_s) + 5)

        # Server i's link (ps/link.py); wrap_link may wrap each (an emulated slow link).
        self.links: list[Link] = [(wrap_link or (lambda x: x))(link(a)) for a in addresses]
        self._pool = ThreadPoolExecutor(max_workers=len(addresses) * in_flight,
                                        thread_name_prefix="psclient")
        self.placement: Placement | None = None
        self._keys: dict[int, list[Key]] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._read_versions: dict[KeyId, int] = {}  # version of each key at our last pull
        # Seconds the servers held the last pull (or push_pull's pull half) at a barrier or
        # the staleness bound, as they measured it: the longest of its requests, which wait
        # at once. The rest of the round trip is the wire (and the servers' work).
        self.last_blocked_s = 0.0

    @property
    def _stubs(self) -> list[dict[str, Callable]]:
        """Each server's gRPC methods by name (tests replace one to script a failure)."""
        return [link.methods for link in self.links]

    @property
    def _mailboxes(self) -> dict[int, object]:
        """Server -> its mailbox (None: refused), for the servers a fast link attached to."""
        return {s: link.mailbox for s, link in enumerate(self.links)
                if getattr(link, "attached", False)}

    # -- calls ----------------------------------------------------------------------------

    def _run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Run tasks on the client's threads in parallel (inline if one); results in order."""
        if len(tasks) == 1:
            return [tasks[0]()]
        futures = [self._pool.submit(task) for task in tasks]
        return [f.result() for f in futures]

    def _call_all(self, method: str, request, timeout: float | None = None) -> list:
        """One control call to every server in parallel; replies in server order."""
        timeout = self.deadline_s if timeout is None else timeout
        return self._run([partial(link.call, method, request, timeout) for link in self.links])


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
            replies = self._call_all("Layout", ps_pb2.LayoutRequest())
            keys = {s: [Key(k.name, tuple(k.tensor_shape), k.start, k.stop) for k in r.keys]
                    for s, r in enumerate(replies)}
            if not any(keys.values()):
                raise RuntimeError("the servers hold no parameters yet: call init() first")
            self._set_keys(keys)
        return self._keys

    def _set_keys(self, keys: dict[int, list[Key]]) -> None:
        self._keys = keys
        self._shapes = {k.name: k.tensor_shape for ks in keys.values() for k in ks}
        for server, link in enumerate(self.links):
            link.set_keys(keys.get(server, []))

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
        `settings` are OptimizerConfig fields (lr, momentum, beta1, lr_schedule, ...).
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
        layout = place(specs, len(self.links), placement, split_bytes)
        keys = cut(layout, self.chunk_bytes)
        settings_msg = ps_pb2.OptimizerSettings(
            name=config.name, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            beta1=config.beta1, beta2=config.beta2, eps=config.eps,
            weight_decay=config.weight_decay, lr_schedule=config.lr_schedule or "",
            planned_steps=config.planned_steps or 0)

        def send(server: int, group: list[Key]) -> ps_pb2.InitReply:
            msg = ps_pb2.InitRequest()
            msg.optimizer.CopyFrom(settings_msg)
            for k in keys[server]:
                msg.keys.add(name=k.name, tensor_shape=k.tensor_shape, start=k.start,
                             stop=k.stop)
            for k in group:
                write_slice(msg.values.add(), k.name, k.start, arrays[k.name][k.start:k.stop])
            return self.links[server].call("Init", msg, self.deadline_s)

        groups = self._groups(keys)
        first = {}
        for server, group in groups:
            first.setdefault(server, group)
        # The first request of each server sets its layout; the rest may then run in parallel.
        self._run([partial(send, s, g) for s, g in first.items()])
        self._run([partial(send, s, g) for s, g in groups if g is not first[s]])
        self.placement = layout
        self._set_keys(keys)
        return layout

    def pull(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Every tensor, whole. `step`: the step this worker is about to compute (sync and ssp
        wait until the servers allow it); None: the newest weights at once."""
        keys = self._layout()
        timeout = self.deadline_s if step is None else self.wait_s
        flat = self._empty()

        def fetch(server: int, group: list[Key]) -> PullReplyView:
            return self.links[server].pull(group, step, self.wire_dtype, timeout, flat)

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
            gradients = self._gradients(step, group, flat, scale)
            return self.links[server].push(gradients, self.deadline_s)

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
            gradients = self._gradients(step, group, grads_flat, scale)
            return self.links[server].push_pull(gradients, self.wait_s, flat)

        replies = self._run([partial(exchange, s, g) for s, g in self._groups(keys)])
        self._finish(replies)
        return PushPullResult(self._shaped(flat),
                              max((r.staleness_max for r in replies), default=0),
                              any(r.step_skipped for r in replies), self.last_blocked_s)

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

    def _gradients(self, step: int, group: list[Key], flat: dict[str, np.ndarray] | None,
                   scale: float) -> Gradients:
        """A group's gradients (flat None: a skipped step, no values), each with the version
        it was computed from: the server measures staleness against it."""
        empty = np.zeros(0, np.float32)
        items = [(k, empty if flat is None else flat[k.name][k.start:k.stop],
                  self._read_versions.get(k.id, 0)) for k in group]
        return Gradients(step, items, self.wire_dtype, scale, flat is None)

    def _finish(self, replies: list[PullReplyView]) -> None:
        """Remember the versions read: the next push reports them, for staleness; and how
        long the servers held the pull."""
        self.last_blocked_s = max((r.blocked_s for r in replies), default=0.0)
        for reply in replies:
            self._read_versions.update(((p.name, p.start), p.version) for p in reply.slices)

    def versions(self) -> list[dict]:
        """Per server: initialised, min_version, max_version, clocks (worker -> steps),
        start_step (where this worker would start; see start_step)."""
        replies = self._call_all("Version", ps_pb2.VersionRequest(worker=self.worker_id))
        return [_reply_dict(r) for r in replies]

    def start_step(self) -> int:
        """The step this worker starts at: 0 in a new run; after a restart or a resume, as
        far as the servers say (the furthest of them: a server behind skips ahead)."""
        return max(v["start_step"] for v in self.versions())

    def leave(self, worker: int) -> int:
        """Tell every server that `worker` is gone, so that no barrier waits for it;
        returns on how many servers it was live."""
        replies = self._call_all("Leave", ps_pb2.LeaveRequest(worker=worker))
        return sum(r.removed for r in replies)

    def stats(self) -> list[dict]:
        """Per server: its counters (see StatsReply in proto/ps.proto) and its address."""
        replies = self._call_all("Stats", ps_pb2.StatsRequest())
        return [dict(_reply_dict(r), index=i, address=self.addresses[i])
                for i, r in enumerate(replies)]

    def shutdown(self) -> None:
        """Ask every server to stop."""
        self._call_all("Shutdown", ps_pb2.ShutdownRequest())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for link in self.links:
            link.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
