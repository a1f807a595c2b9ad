"""Transport speed: tinyps pull/push against a raw gRPC bytes echo, chunks against one message,
and tensors through a shared-memory mailbox against tensors in the messages.

A worker step moves the model twice: gradients up, weights down. The raw echo does the same
(bytes up, the same bytes down) with no work in between; tinyps also checks and applies the
gradients. Both use 4 MiB messages, four in flight. The mailbox comparison runs a 64 MiB
model and the peer benchmarks' (784-256-128-10, 0.9 MiB), where per-call costs weigh more.

Run with `make bench`. The servers run in their own processes (as in a real cluster, and so
that client and server do not share one interpreter lock); each comparison alternates its two
contenders round by round. Prints a table and writes benchmarks/results/transport.json.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Comparison, compare, table  # noqa: E402

from ps.client import PSClient  # noqa: E402
from ps.codec import MAX_MESSAGE_BYTES  # noqa: E402
from ps.memory import keep_freed_buffers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"
MODEL_BYTES = 64 * 1024 * 1024
PEER_MODEL_BYTES = 4 * (784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10)
CHUNK = 4 * 1024 * 1024
IN_FLIGHT = 4
ECHO = "/bench.Echo/Echo"
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]


def _echo_server(ports) -> None:
    keep_freed_buffers()
    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports.put(port)
    server.wait_for_termination()


def _ps_server(ports, workers: int = 1) -> None:
    from ps.server import serve

    keep_freed_buffers()
    running = serve(mode="async", workers=workers)
    ports.put(running.port)
    running.wait()


def _start(target, *args) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=target, args=(ports, *args), daemon=True)
    proc.start()
    return proc, f"127.0.0.1:{ports.get(timeout=60)}"


class RawEcho:
    """Raw bytes through the echo server, as one message or as chunks with several in flight."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        self.call = self.channel.unary_unary(ECHO)
        self.pool = ThreadPoolExecutor(max_workers=IN_FLIGHT)

    def one(self, payload: bytes) -> bytes:
        return self.call(payload, timeout=120)

    def chunked(self, chunks: list[bytes]) -> list[bytes]:
        return list(self.pool.map(lambda c: self.call(c, timeout=120), chunks))


def transport_comparisons() -> tuple[list[Comparison], dict]:
    keep_freed_buffers()  # in every process of the run, the echo's included
    echo_proc, echo_addr = _start(_echo_server)
    ps_proc, ps_addr = _start(_ps_server)
    try:
        echo = RawEcho(echo_addr)
        rng = np.random.default_rng(0)
        model = {"big": rng.standard_normal(MODEL_BYTES // 4, dtype=np.float32)
                 .reshape(-1, 1024)}
        grad = {"big": np.zeros_like(model["big"])}  # zero: the weights stay as they are
        payload = model["big"].tobytes()
        chunks = [payload[i:i + CHUNK] for i in range(0, len(payload), CHUNK)]
        chunked = PSClient([ps_addr], chunk_bytes=CHUNK, in_flight=IN_FLIGHT, deadline_s=120)
        chunked.init(model, "sgd", lr=0.1)
        whole = PSClient([ps_addr], chunk_bytes=MODEL_BYTES, deadline_s=120)
        step = {"n": 0}

        def pull_push(client: PSClient) -> None:
            client.pull()
            client.push(grad, step["n"])
            step["n"] += 1

        def fused(client: PSClient) -> None:
            client.push_pull(grad, step["n"])
            step["n"] += 1

        runs = [
            compare("push+pull 64 MiB (one PushPull) vs raw echo",
                    ("tinyps push_pull", lambda: fused(chunked)),
                    ("raw bytes echo", lambda: echo.chunked(chunks)), goal=0.7, rounds=7),
            compare("pull, then push 64 MiB vs raw echo",
                    ("tinyps pull; push", lambda: pull_push(chunked)),
                    ("raw bytes echo", lambda: echo.chunked(chunks)), rounds=7),
            compare("64 MiB as 4 MiB chunks vs one message (raw echo)",
                    ("16 x 4 MiB, 4 in flight", lambda: echo.chunked(chunks)),
                    ("1 x 64 MiB", lambda: echo.one(payload)), goal=1.3, rounds=7),
            compare("64 MiB pull+push: 4 MiB chunks vs one message (tinyps)",
                    ("16 x 4 MiB, 4 in flight", lambda: pull_push(chunked)),
                    ("1 x 64 MiB", lambda: pull_push(whole)), rounds=7),
            compare("control call: version check vs empty raw echo",
                    ("PSClient.versions()", chunked.versions),
                    ("empty echo", lambda: echo.one(b"")), goal=1 / 1.25),
        ]
        for size, label in ((MODEL_BYTES, "64 MiB"), (PEER_MODEL_BYTES, "0.9 MiB")):
            runs.append(_mailbox_comparison(model["big"].reshape(-1)[:size // 4], label))
        chunked.close()
        whole.close()
        machine = {"model_bytes": MODEL_BYTES, "chunk_bytes": CHUNK, "in_flight": IN_FLIGHT}
        return runs, machine
    finally:
        for proc in (echo_proc, ps_proc):
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _mailbox_comparison(values: np.ndarray, label: str) -> Comparison:
    """PushPull of `values` through a mailbox and in the messages, two workers of one server."""
    proc, address = _start(_ps_server, 2)
    try:
        shm, wire = (PSClient([address], chunk_bytes=CHUNK, in_flight=IN_FLIGHT, deadline_s=120,
                              shared_memory=shared, worker_id=w)
                     for w, shared in ((0, True), (1, False)))
        shm.init({"w": values}, "sgd", lr=0.1)
        zero = {"w": np.zeros_like(values)}  # the weights stay as they are
        steps = {shm: 0, wire: 0}

        def exchange(client: PSClient) -> None:
            client.push_pull(zero, steps[client])
            steps[client] += 1

        result = compare(f"push+pull {label}: through a mailbox vs in the messages",
                         ("shared memory", lambda: exchange(shm)),
                         ("gRPC bytes", lambda: exchange(wire)), rounds=7)
        shm.close()
        wire.close()
        return result
    finally:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def main() -> int:
    started = time.perf_counter()
    runs, setup = transport_comparisons()
    print(table("transport", runs))
    print("speedup = baseline time / ours; for the control call the goal >= 0.80x means "
          "its latency is at most 1.25x the empty echo's")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"setup": setup, "transport": [r.as_dict() for r in runs],
                                   "bench_s": time.perf_counter() - started}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
