"""A parameter-server process: the store behind a gRPC server, with health and reflection.

`serve(...)` starts one in this process and returns at once; `tinyps server` runs one as a
process of its own until it is shut down (by the Shutdown call, SIGTERM or Ctrl-C). With
checkpointing it writes its shard every N updates and once more when it stops, and it can
start from the newest checkpoint: a restarted server picks up where its shard was saved.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps.checkpoint import latest_checkpoint, write_checkpoint
from ps.codec import MAX_MESSAGE_BYTES
from ps.local import LocalServer
from ps.security import TLSFiles, TokenInterceptor, server_credentials
from ps.service import SERVICE_NAME, ParameterServerServicer, add_to_server, local_handlers
from ps.store import Store, StoreConfig

__all__ = ["Checkpointing", "RunningServer", "SERVICE_NAME", "serve"]


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a server writes its shard."""

    directory: Path  # this server's own directory (ps.checkpoint.server_directory)
    every: int = 100  # write when the shard's every key has this many more updates
    keep: int = 3  # checkpoints kept; older ones are deleted
    restore: bool = False  # start from the newest checkpoint in `directory`, if there is one

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint every and keep must be >= 1, got {self.every}, "
                             f"{self.keep}")


@dataclass
class _Checkpointer:
    """A thread that writes the store's snapshot each time its versions pass a multiple of
    `every` (the first right after initialisation, so that a restart always finds one)."""

    store: Store
    policy: Checkpointing
    written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        target = 0
        while not self.store.closed:
            if self.store.wait_version(target, timeout=1.0):
                seq = self.write()
                target = (seq // self.policy.every + 1) * self.policy.every

    def write(self) -> int:
        """Write a checkpoint now; returns its seq (the shard's min version)."""
        with self.lock:
            snapshot = self.store.snapshot()
            # The count travels in the checkpoint, so that a restarted server goes on from it.
            snapshot.counters["checkpoints_written"] = self.written + 1
            write_checkpoint(self.policy.directory, snapshot, self.policy.keep)
            self.written += 1
            return snapshot.seq



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
    _stopping: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new calls, wake waiting ones (they answer UNAVAILABLE, so that clients
        retry), let calls in flight finish for `grace` s, then write a final checkpoint."""
        with self._stopping:
            if self._stopped.is_set():
                return
            self.store.close()
            # The calls woken by the close answer UNAVAILABLE (so clients retry) once their
            # threads run: wait for that, not for a guess at how long a busy machine takes.
            self.store.wait_idle(grace + 10)
            self.server.stop(grace).wait(grace + 5)
            if self.local is not None:
                self.local.stop()  # after the calls in flight: they answered through it
            if self._checkpointer is not None:
                self._thread.join()
                if self.store.stats()["initialised"]:
                    self._checkpointer.write()
            self._stopped.set()

    @property
    def checkpoints_written(self) -> int:
        return 0 if self._checkpointer is None else self._checkpointer.written

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if `timeout` passed first."""
        return self._stopped.wait(timeout)


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    mode: str = "sync",
    workers: int = 1,
    staleness: int = 0,
    *,
    staleness_lr: bool = False,
    max_staleness: int | None = None,
    threads: int | None = None,
    token: str | None = None,
    tls: TLSFiles | None = None,
    backup_workers: int = 0,
    aggregate: str = "mean",
    lease_s: float | None = None,
    checkpointing: Checkpointing | None = None,
    dp_noise_std: float = 0.0,
    dp_seed: int | None = None,
) -> RunningServer:
    """Start a parameter server on host:port (0: a free port) and return it running.

    token: every call of the tinyps service must carry it (health and reflection stay open).
    tls: serve over TLS; with tls.ca set, clients must show a certificate signed by it.
    backup_workers, aggregate, lease_s, dp_noise_std, dp_seed: see StoreConfig.
    checkpointing: write checkpoints (and, with restore, start from the newest one).
    """
    store = Store(StoreConfig(mode=mode, workers=workers, staleness=staleness,
                              staleness_lr=staleness_lr, max_staleness=max_staleness,
                              backup_workers=backup_workers, aggregate=aggregate,
                              lease_s=lease_s, dp_noise_std=dp_noise_std, dp_seed=dp_seed))
    checkpointer = None
    if checkpointing is not None:
        checkpointer = _Checkpointer(store, checkpointing)
        if checkpointing.restore and (snapshot := latest_checkpoint(checkpointing.directory)):
            store.restore(snapshot)
            checkpointer.written = int(snapshot.counters.get("checkpoints_written", 0))
    # Pulls that wait on a barrier hold a thread each; the pool leaves room for every worker's
    # waiting pulls (a few chunks each) and their pushes, so waiting can never starve the
    # pushes that would end the wait.
    pool = ThreadPoolExecutor(max_workers=threads or 8 * (workers + 1) + 8,
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
        return {"checkpoints_written": running.checkpoints_written if running else 0}

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
