"""tinyps on the peer benchmarks' workload, as one more system of ../shared/peers/run_all.sh.

Real processes, as `tinyps launch` runs them: one `tinyps server` process and W worker
processes (spawned) that train the workload of ../shared/peers/common.py exactly: the same
data, initial weights, batches (worker w walks its contiguous shard 64 rows a step), plain SGD
at lr 0.05, one thread per process, and the same timing window (steps 1 .. S-1, step 0 a
warm-up). Prints the one JSON report line the harness expects:

    EXTRA="tinyps=$PWD/.venv/bin/python $PWD/benchmarks/peer_workload.py" \\
      PY=/tmp/peers-venv/bin/python bash ../shared/peers/run_all.sh
"""

from __future__ import annotations

import os

for _key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_key, "1")  # before NumPy loads BLAS; children inherit it

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

PEERS = Path(os.environ.get("PEERS_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers"))
sys.path.insert(0, str(PEERS))

import common  # noqa: E402
import numpy as np  # noqa: E402

SYSTEM = "tinyps"


def _worker(results, addresses: list[str], worker: int, cfg: common.RunConfig,
            start_time: float, fused: bool, shared: bool) -> None:
    from ps.client import PSClient
    from ps.memory import keep_freed_buffers
    from worker.loop import WorkerConfig, run_worker
    from worker.model import MLP
    from worker.shards import Shard

    keep_freed_buffers()
    x, y = common.make_data()
    shard_rows = common.N_SAMPLES // cfg.workers
    rows = np.arange(worker * shard_rows, (worker + 1) * shard_rows)
    shard = Shard(x[rows], y[rows], rows)
    model = MLP(common.LAYERS, seed=common.INIT_SEED)  # common.init_params, draw for draw
    origin = time.monotonic() - (time.time() - start_time)
    with PSClient(addresses, worker_id=worker, shared_memory=shared) as client:
        client.init(model.init_params(), "sgd", lr=common.LR)
        records = run_worker(client, model, shard,
                             WorkerConfig(steps=cfg.steps, batch_size=common.BATCH_PER_WORKER,
                                          shuffle=False, fused=fused), origin=origin)
    results.put((worker, [r.as_dict() for r in records]))


def run(cfg: common.RunConfig, fused: bool = True,
        shared: bool = True) -> tuple[dict, list[dict]]:
    """Train the workload on a real tinyps cluster; return (report extras, step records)."""
    from ps.client import PSClient
    from tinyps.config import LaunchConfig
    from tinyps.local_backend import start_servers
    from tinyps.processes import end_all

    config = LaunchConfig.from_flat({"servers": 1, "workers": cfg.workers, "mode": cfg.mode})
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as run_dir:
        servers, addresses = start_servers(config, Path(run_dir))
        procs = []
        try:
            results = ctx.Queue()
            start = time.time()
            procs = [ctx.Process(target=_worker,
                                 args=(results, addresses, w, cfg, start, fused, shared))
                     for w in range(cfg.workers)]
            for p in procs:
                p.start()
            per_worker = dict(results.get(timeout=600) for _ in procs)
            for p in procs:
                p.join(30)
            with PSClient(addresses) as client:
                params = client.pull()
                stats = client.stats()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            end_all(servers)
    records = [r for rs in per_worker.values() for r in rs]
    return {"params": params, "stats": stats, "per_worker": per_worker}, records


def timed_window(per_worker: dict[int, list[dict]], steps: int) -> tuple[float, float]:
    """(start, end) of steps 1 .. S-1: from the last worker's end of step 0 to the last
    worker's end of step S-1, in the run's shared clock."""
    start = max(rs[0]["time"] for rs in per_worker.values())
    end = max(rs[steps - 1]["time"] for rs in per_worker.values())
    return start, end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_cli(parser)
    parser.add_argument("--no-fused", dest="fused", action="store_false",
                        help="pull and push as two calls instead of one PushPull")
    parser.add_argument("--no-shared-memory", dest="shared", action="store_false",
                        help="every call through gRPC, tensors in the messages (no mailbox, "
                             "no local socket)")
    args = parser.parse_args()
    cfg = common.RunConfig(args.mode, args.workers, args.steps)
    try:
        out, records = run(cfg, args.fused, args.shared)
    except Exception as err:  # the harness wants a line saying why, not a traceback
        common.fail(SYSTEM, args, f"{type(err).__name__}: {err}")
    start, end = timed_window(out["per_worker"], cfg.steps)
    updates = (cfg.steps - 1) * (1 if cfg.mode == "sync" else cfg.workers)
    x, y = common.make_data()
    names = [f"dense{i}.{kind}" for i in range(len(common.LAYERS) - 1)
             for kind in ("weight", "bias")]
    loss, acc = common.evaluate([out["params"][n] for n in names], x, y)
    timed = [r for r in records if r["step"] >= 1]
    compute = sum(r["compute_s"] for r in timed)
    waited = sum(r["wait_s"] for r in timed)
    common.report(
        SYSTEM, cfg, end - start, updates, loss, acc, common.data_fingerprint(x, y),
        extra={"compute_processes": cfg.workers + 1, "threads": common.thread_settings(),
               "fused_push_pull": args.fused, "shared_memory": args.shared,
               "compute_share": round(compute / (compute + waited), 3)},
    )


if __name__ == "__main__":
    main()
