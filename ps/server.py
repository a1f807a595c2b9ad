"""A parameter-server process: the store behind a gRPC server, with health and reflection.

`serve(...)` starts one in this process and returns at once; `tinyps server` runs one as a
process of its own until it is shut down (by the Shutdown call, SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps.security import TLSFiles, TokenInterceptor, server_credentials
from ps.service import SERVICE_NAME, ParameterServerServicer, add_to_server
from ps.store import Store, StoreConfig
from ps.wire import MAX_MESSAGE_BYTES

__all__ = ["RunningServer", "SERVICE_NAME", "serve"]



@dataclass
class RunningServer:
    """A started server: its gRPC handle, bound port and store."""

    server: grpc.Server
    port: int
    host: str
    store: Store
    _stopped: threading.Event

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        """Refuse new calls, wake waiting ones, let calls in flight finish for `grace` s."""
        self.store.close()
        self.server.stop(grace).wait(grace + 5)
        self._stopped.set()

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
) -> RunningServer:
    """Start a parameter server on host:port (0: a free port) and return it running.

    token: every call of the tinyps service must carry it (health and reflection stay open).
    tls: serve over TLS; with tls.ca set, clients must show a certificate signed by it.
    """
    store = Store(StoreConfig(mode=mode, workers=workers, staleness=staleness,
                              staleness_lr=staleness_lr, max_staleness=max_staleness))
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

    add_to_server(ParameterServerServicer(store, shutdown_soon), server)
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
        raise OSError(f"cannot bind {host}:{port}: is the port in use?")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, bound, host, store, stopped)
    return running
