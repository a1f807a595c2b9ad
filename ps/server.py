"""A parameter-server process: the store behind a gRPC server, with health and reflection.

`serve(...)` starts one in this process and returns at once; `tinyps server` runs one as a
process of its own until it is shut down (by the Shutdown call, SIGTERM or Ctrl-C). With
checkpointing it writes its shard every N updates and once more when it stops, and it can
start from the newest checkpoint: a restarted server picks up where its shard was saved.
"""

from __future__ import annotations

import errno
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps.checkpoint import CheckpointError, checkpoint_path, latest_checkpoint, write_checkpoint
from ps.checkpoint_set import protected_files
from ps.codec import MAX_MESSAGE_BYTES
from ps.local import LocalServer
from ps.security import SecurityConfig, TokenInterceptor, server_credentials
from ps.service import SERVICE_NAME, ParameterServerServicer, add_to_server, local_handlers
from ps.settings import from_flat, part, setting
from ps.store import Store
from ps.store_config import StoreConfig

__all__ = ["CheckpointConfig", "RunningServer", "SERVICE_NAME", "ServerConfig", "serve"]

_log = logging.getLogger(__name__)  # unconfigured, a warning goes to stderr: the server's log


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a server writes its shard."""

    checkpoint_dir: str | None = setting(
        None, "where checkpoints go: a server's own folder (tinyps server: none by default), "
              "or a run's, one folder per server (tinyps launch: RUN_DIR/checkpoints)")
    checkpoint_every: int = setting(100, "a server writes its shard every N updates")
    keep_checkpoints: int = setting(3, "checkpoints kept per server; older ones are deleted")
    restore: bool = setting(
        False, "start from the newest checkpoint in --checkpoint-dir, if there is one")

    def __post_init__(self) -> None:
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.restore and self.checkpoint_dir is None:
            raise ValueError("--restore needs --checkpoint-dir (where the checkpoints are)")

    @property
    def directory(self) -> Path | None:
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir)


@dataclass(frozen=True)
class ServerConfig:
    """Everything one parameter-server process is told: `serve(config)` runs it."""

    host: str = setting("127.0.0.1", "the address to bind (127.0.0.1: this machine only)")
    port: int = setting(0, "the port to bind (0: a free one)")
    threads: int | None = setting(
        None, "handler threads (default: --max-waiting per worker and 16 more, so that waiting "
              "calls never starve the pushes that end their wait, nor control calls); fewer "
              "than workers x max-waiting + 1 are refused")
    store: StoreConfig = part(StoreConfig)
    checkpoint: CheckpointConfig = part(CheckpointConfig)
    security: SecurityConfig = part(SecurityConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        waiting = self.store.workers * self.store.max_waiting
        if self.threads is not None and self.threads <= waiting:
            raise ValueError(
                f"threads {self.threads} leaves no thread for pushes and control calls when "
                f"the {self.store.workers} workers hold their {self.store.max_waiting} waiting "
                f"calls each ({waiting}): give more than {waiting}, or lower --max-waiting")


def _failure(path: Path, err: Exception) -> str:
    """A failed checkpoint write in one line: the file, and the errno's text and name."""
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename and Path(err.filename) != path else ""
        name = errno.errorcode.get(err.errno, str(err.errno))
        return f"cannot write checkpoint {path}: {err.strerror} [{name}]{where}"
    if isinstance(err, CheckpointError):  # a refused snapshot: it says why
        return f"refused checkpoint {path}: {err}"
    return f"cannot write checkpoint {path}: {type(err).__name__}: {err}"


@dataclass
class _Checkpointer:
    """A thread that writes the store's snapshot each time its versions pass a multiple of
    `every` (the first right after initialisation, so that a restart always finds one).

    A write that fails (a full or broken disk, a refused snapshot) is counted and reported
    (Stats: checkpoint_failures, checkpoint_error) and never ends the thread: the next
    multiple, or the final write, tries again."""

    store: Store
    policy: CheckpointConfig
    written: int = 0
    failures: int = 0  # write attempts that failed, in all (carried across a restart)
    error: str = ""  # the latest failure, "" if none
    lock: threading.Lock = field(default_factory=threading.Lock)
    _tried: int = 0  # the seq of the latest attempt, failed or not

    def run(self) -> None:
        every, target = self.policy.checkpoint_every, 0
        while not self.store.closed:
            if self.store.wait_version(target, timeout=1.0):
                self.write()
                # After a failure too: the next multiple tries again, not a busy loop.
                target = (max(self._tried, target) // every + 1) * every

    def write(self) -> int | None:
        """Write a checkpoint now; its seq (the shard's min version), or None if it failed
        (counted, logged, and no .tmp left: the disk keeps every earlier checkpoint)."""
        with self.lock:
            directory = self.policy.directory
            path = directory
            try:
                snapshot = self.store.snapshot()
                self._tried = snapshot.seq
                path = checkpoint_path(directory, snapshot.seq)
                # The counts travel in the checkpoint, so that a restarted server goes on.
                snapshot.counters["checkpoints_written"] = self.written + 1
                snapshot.counters["checkpoint_failures"] = self.failures
                every = self.policy.checkpoint_every
                write_checkpoint(directory, snapshot, self.policy.keep_checkpoints,
                                 round_step=snapshot.seq // every * every,
                                 final=self.store.closed,
                                 protect=protected_files(directory))
            # Whatever the disk or the snapshot does, this thread must live on: a dead
            # checkpointer would leave the run without checkpoints and say nothing.
            except Exception as err:
                self.failures += 1
                self.error = _failure(path, err)
                _log.warning("%s (%d failed so far; the next checkpoint tries again)",
                             self.error, self.failures)
                return None
            self.written += 1
            return snapshot.seq

    def stats(self) -> dict:
        """For the Stats reply (see StatsReply in proto/ps.proto). Without the lock: a Stats
        call must not wait for a write to finish, and each field is read whole."""
        return {"checkpoints_written": self.written, "checkpoint_failures": self.failures,
                "checkpoint_error": self.error}


@dataclass
class RunningServer:
    """A started server: its gRPC handle, bound port and store."""

    server: grpc.Server
    port: int
    host: str
    store: Store
    _stopped: threading.Event
    _checkpointer: _Checkpointer | None = None
    _thread: threading.Thread | None = None
    local: LocalServer | None = None  # the local channel, for workers on this host
    # Held only to claim the stop, never across it: a second stop (a second Ctrl-C, a
    # Shutdown call during SIGTERM) must never wait on the first one's lock.
    _claim: threading.Lock = field(default_factory=threading.Lock)
    _claimed: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0, timeout: float | None = None) -> bool:
        """Refuse new calls, wake waiting ones (they answer UNAVAILABLE, so that clients
        retry), let calls in flight finish for `grace` s, then write a final checkpoint.

        Safe to call again, from any thread, while a stop is under way: a later call does not
        stop anything twice, it waits for the first at most `timeout` s (default: what the
        first may take) and returns whether the server has stopped."""
        with self._claim:
            first, self._claimed = not self._claimed, True
        if not first:
            return self._stopped.wait(grace + 30 if timeout is None else timeout)
        try:
            self.store.close()
            # The calls woken by the close answer UNAVAILABLE (so clients retry) once their
            # threads run: wait for that, not for a guess at how long a busy machine takes.
            self.store.wait_idle(grace + 10)
            self.server.stop(grace).wait(grace + 5)
            if self.local is not None:
                self.local.stop()  # after the calls in flight: they answered through it
            if self._checkpointer is not None:
                self._thread.join(grace + 10)  # it wakes each second to see the store closed
                if self.store.stats()["initialised"]:
                    self._checkpointer.write()
        finally:
            self._stopped.set()
        return True

    @property
    def checkpoints_written(self) -> int:
        return 0 if self._checkpointer is None else self._checkpointer.written

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if `timeout` passed first."""
        return self._stopped.wait(timeout)


def serve(config: ServerConfig | None = None, **settings) -> RunningServer:
    """Start a parameter server and return it running (port 0: a free port).

    `serve(ServerConfig(...))`, or the settings by name as a shorthand:
    `serve(mode="async", workers=2, token="s3cret")`. The token guards every call of the
    tinyps service (health and reflection stay open); with TLS files the server speaks TLS,
    and with a CA it demands client certificates; with a checkpoint folder it writes
    checkpoints (and, with restore, starts from the newest one).
    """
    if config is None:
        config = from_flat(ServerConfig, settings, where="serve")
    elif settings:
        raise TypeError(f"serve: give a ServerConfig or settings by name, not both "
                        f"({sorted(settings)})")
    host, port, workers = config.host, config.port, config.store.workers
    token, tls = config.security.token, config.security.tls(client=False)
    store = Store(config.store)
    checkpointer = None
    checkpointing = config.checkpoint
    if checkpointing.directory is not None:
        checkpointer = _Checkpointer(store, checkpointing)
        if checkpointing.restore and (snapshot := latest_checkpoint(checkpointing.directory)):
            store.restore(snapshot)
            checkpointer.written = int(snapshot.counters.get("checkpoints_written", 0))
            checkpointer.failures = int(snapshot.counters.get("checkpoint_failures", 0))
    # The pool rule. Only calls that may wait (a pull of a step, a PushPull) hold a thread for
    # long, and the store admits at most max_waiting of them per worker id, refusing one more
    # at once with RESOURCE_EXHAUSTED (Store.waiting_room; worker ids out of range are refused
    # before they wait). So at most workers * max_waiting threads wait, and the pool has 16
    # more: whatever the clients do, pushes (which never wait, and open the barriers), Init
    # and the control calls (Stats, Version, Health, Leave, Shutdown, Layout) always find a
    # thread after at most a short queue. No maximum_concurrent_rpcs: it would refuse control
    # calls too, where the rooms refuse only the calls that wait.
    pool = ThreadPoolExecutor(
        max_workers=config.threads or workers * config.store.max_waiting + 16,
        thread_name_prefix="ps-handler")
    server = grpc.server(pool, options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ], interceptors=[TokenInterceptor(token)] if token else None)
    stopped = threading.Event()
    running: RunningServer | None = None

    def shutdown_soon() -> None:
        # Answer the Shutdown call first, then stop from another thread.
        threading.Thread(target=lambda: running.stop(), daemon=True).start()

    def extra_stats() -> dict:
        return {} if checkpointer is None else checkpointer.stats()

    servicer = ParameterServerServicer(store, shutdown_soon, extra_stats)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls))
    except RuntimeError:  # newer gRPC raises where older ones returned 0
        bound = 0
    if bound == 0 or (port and bound != port):
        server.stop(0)
        raise OSError(f"cannot bind {host}:{port}: is the port in use?" + (
            "" if tls is None else " Or are the TLS certificate and key not a valid PEM pair?"))
    server.start()
    # Workers on this host may also call over a Unix socket, off gRPC (ps/local.py); with
    # TLS, who asked for it asked for every byte on the encrypted channel: gRPC only.
    local = None
    if tls is None:
        local = LocalServer(local_handlers(servicer))
        if local.start():
            servicer.offer_local(local.name, local.key)
        else:
            local = None
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    thread = None
    if checkpointer is not None:
        thread = threading.Thread(target=checkpointer.run, name="checkpointer", daemon=True)
        thread.start()
    running = RunningServer(server, bound, host, store, stopped, checkpointer, thread, local)
    return running
