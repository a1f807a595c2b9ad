"""Helpers that start parameter servers and workers for tests, and always end them.

In-process servers (threads) serve the wire-level tests; spawned processes serve the tests
where separate processes are the point. Every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import queue

import numpy as np

SPAWN = mp.get_context("spawn")  # never fork after gRPC is imported
START_TIMEOUT_S = 60.0


def _server_main(ports: mp.Queue, kwargs: dict) -> None:
    from ps.server import serve

    running = serve(**kwargs)
    ports.put(running.port)
    running.wait()


def spawn_server(**kwargs) -> tuple[mp.Process, str]:
    """A server in its own process; returns it and its address once it listens."""
    ports = SPAWN.Queue()
    proc = SPAWN.Process(target=_server_main, args=(ports, kwargs), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        end_process(proc)
        raise RuntimeError("server process did not report its port in time") from None
    return proc, f"127.0.0.1:{port}"


def end_process(proc: mp.Process, timeout: float = 10.0) -> None:
    """Terminate, then kill; never leave a process behind."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


def _worker_main(results: mp.Queue, spec: dict) -> None:
    """A worker process: load data, take its shard, run the loop, report records and weights."""
    from ps.client import PSClient
    from worker.data import load_dataset
    from worker.loop import WorkerConfig, run_worker
    from worker.model import MLP
    from worker.shards import partition

    data = load_dataset(spec["dataset"], seed=spec["seed"])
    shard = partition(data, spec["workers"], spec.get("scheme", "iid"), seed=spec["seed"])[
        spec["worker"]]
    model = MLP((data.n_features, *spec["hidden"], data.n_classes), seed=spec["seed"])
    with PSClient(spec["addresses"], worker_id=spec["worker"]) as client:
        client.init(model.init_params(), spec.get("optimizer", "sgd"), lr=spec["lr"])
        records = run_worker(client, model, shard, WorkerConfig(**spec["config"]),
                             origin=spec.get("origin"))
    results.put((spec["worker"], [r.as_dict() for r in records]))


def run_worker_processes(specs: list[dict], timeout: float = 240.0) -> dict[int, list[dict]]:
    """Run one spawned process per spec; return worker -> its step records."""
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=_worker_main, args=(results, s), daemon=True) for s in specs]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in specs:
            worker, records = results.get(timeout=timeout)
            out[worker] = records
    finally:
        for p in procs:
            p.join(10)
            end_process(p)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"worker exit codes {[p.exitcode for p in procs]}")
    return out


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float) -> None:
    """Relative error of each tensor, as a norm, within rtol."""
    for name, value in want.items():
        err = np.linalg.norm(got[name] - value) / max(np.linalg.norm(value), 1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
