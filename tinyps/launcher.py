"""The launcher: a whole cluster on this machine, from start to report, with nothing left behind.

It starts S server processes and waits for their health checks, starts W worker processes,
follows their metrics into one progress bar, and at the end evaluates the trained model,
writes the run directory (config.json, metrics.jsonl, summary.json, logs/, report.png) and
stops every process: on success, on failure and on Ctrl-C alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ps.client import PSClient, wait_healthy
from ps.memory import keep_freed_buffers
from ps.placement import Placement, TensorSpec, place
from tinyps.config import LaunchConfig
from tinyps.processes import TOKEN_ENV, Child, end_all, start_child, thread_env
from tinyps.report import write_report
from tinyps.summary import build_summary
from worker.data import Dataset, load_dataset
from worker.model import MLP
from worker.process import steps_for

__all__ = ["LaunchError", "Progress", "launch", "server_args", "start_servers"]

# Progress(steps done, steps in all, latest loss per worker, samples per second)
Progress = Callable[[int, int, dict[int, float], float], None]

_POLL_S = 0.05  # how often the launcher looks at its children and their metrics


class LaunchError(RuntimeError):
    """A run that could not start or did not finish; says which process and why."""


@dataclass
class _Follower:
    """Reads the complete new lines of each worker's metrics file."""

    paths: list[Path]
    offsets: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = [0] * len(self.paths)

    def poll(self) -> list[dict]:
        new = []
        for i, path in enumerate(self.paths):
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self.offsets[i])
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offsets[i] += len(complete)
            new += [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.records += new
        return new


def server_args(config: LaunchConfig, ready_file: Path) -> list[str]:
    args = ["server", "--host", config.host, "--port", "0", "--mode", config.mode,
            "--workers", str(config.workers), "--staleness", str(config.staleness),
            "--ready-file", str(ready_file)]
    if config.staleness_lr:
        args.append("--staleness-lr")
    if config.max_staleness is not None:
        args += ["--max-staleness", str(config.max_staleness)]
    return args + _tls_args(config)


def _tls_args(config: LaunchConfig) -> list[str]:
    args = []
    for flag, value in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key),
                        ("--tls-ca", config.tls_ca)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _child_env(config: LaunchConfig) -> dict[str, str]:
    """Thread shares, and the token: in the environment, never on a command line (which
    `ps` shows to every user of the machine)."""
    env = thread_env(config.servers + config.workers)
    if config.token:
        env[TOKEN_ENV] = config.token
    return env


def _worker_args(config: LaunchConfig, index: int, addresses: list[str], steps: int,
                 metrics: Path, start_time: float) -> list[str]:
    args = ["worker", "--servers", ",".join(addresses), "--index", str(index),
            "--workers", str(config.workers), "--dataset", config.dataset,
            "--hidden", ",".join(map(str, config.hidden)), "--steps", str(steps),
            "--batch-size", str(config.batch_size), "--lr", repr(config.lr),
            "--optimizer", config.optimizer, "--momentum", repr(config.momentum),
            "--placement", config.placement, "--partition", config.partition,
            "--alpha", repr(config.alpha), "--slowdown", repr(config.slowdown(index)),
            "--seed", str(config.seed), "--metrics", str(metrics),
            "--precision", config.precision, "--loss-scale", str(config.loss_scale),
            "--start-time", repr(start_time)]
    if config.split_bytes is not None:
        args += ["--split-bytes", str(config.split_bytes)]
    if not config.fused:
        args.append("--no-fused")
    return args + _tls_args(config)


def _wait_ready(children: list[Child], ready_files: list[Path], timeout: float) -> list[str]:
    """Addresses the servers wrote once listening; fails fast if one of them exits."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            if not child.alive():
                raise LaunchError(f"{child.name} exited with code {child.proc.returncode} "
                                  f"before it was ready; its log ends:\n{child.tail()}")
        if all(f.exists() for f in ready_files):
            return [f.read_text().strip() for f in ready_files]
        if time.monotonic() > deadline:
            raise LaunchError(f"servers not ready after {timeout:.0f} s")
        time.sleep(_POLL_S)  # polling the files the servers write, with a deadline


def start_servers(config: LaunchConfig, run_dir: Path) -> tuple[list[Child], list[str]]:
    """Start the servers of a run and wait until each is healthy: (children, addresses)."""
    env = _child_env(config)
    children, ready = [], []
    try:
        for i in range(config.servers):
            ready_file = run_dir / f"server{i}.address"
            ready_file.unlink(missing_ok=True)
            ready.append(ready_file)
            children.append(start_child(f"server{i}", server_args(config, ready_file),
                                        run_dir / "logs" / f"server{i}.log", env))
        addresses = _wait_ready(children, ready, config.startup_timeout_s)
        unhealthy = wait_healthy(addresses, config.startup_timeout_s, config.tls(client=True))
        if unhealthy:
            raise LaunchError(f"servers not serving: {', '.join(unhealthy)}")
        return children, addresses
    except BaseException:
        end_all(children)
        raise


def model_placement(config: LaunchConfig, data: Dataset) -> Placement:
    """The placement every worker computes for this model (the same pure function)."""
    model = MLP((data.n_features, *config.hidden, data.n_classes))
    specs = [TensorSpec(name, shape) for name, shape in model.param_shapes().items()]
    return place(specs, config.servers, config.placement, config.split_bytes)


_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.png", "model.npz",
              "*.address",
              "logs/*.log", "metrics/*.jsonl")


def prepare_run_dir(run_dir: Path) -> None:
    """Make `run_dir` ready for a new run: new, empty, or an earlier run's (whose files are
    removed, so that nothing of it mixes into this one). Anything else is refused."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
        raise ValueError(f"run directory {run_dir} holds files of something other than a "
                         f"tinyps run; choose another --run-dir")
    for pattern in _RUN_FILES:
        for path in run_dir.glob(pattern):
            path.unlink()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics").mkdir(exist_ok=True)


def _warm_numba_cache() -> None:
    """Compile (or load) every kernel once here, so that the workers find them cached."""
    import kernels.warmup

    kernels.warmup.warm_up()


def launch(config: LaunchConfig, progress: Progress | None = None) -> tuple[dict, Path]:
    """Run a cluster to the end; return (summary, run directory)."""
    keep_freed_buffers()
    started = time.time()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir) if config.run_dir else config.default_run_dir(stamp)
    prepare_run_dir(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")

    data = load_dataset(config.dataset, seed=config.seed)
    placement = model_placement(config, data)
    steps = config.steps or steps_for(len(data.X_train), config.workers, config.batch_size,
                                      config.epochs)
    _warm_numba_cache()

    children: list[Child] = []
    try:
        servers, addresses = start_servers(config, run_dir)
        children += servers
        metric_files = [run_dir / "metrics" / f"worker{i}.jsonl" for i in range(config.workers)]
        env = _child_env(config)
        workers = [
            start_child(f"worker{i}", _worker_args(config, i, addresses, steps, metric_files[i],
                                                   started), run_dir / "logs" / f"worker{i}.log",
                        env)
            for i in range(config.workers)
        ]
        children += workers
        records = _follow(workers, servers, _Follower(metric_files), steps * config.workers,
                          progress)
        summary, params = _finish(config, data, placement, addresses, records, steps, started)
    finally:
        end_all(children)

    records.sort(key=lambda r: (r["time"], r["worker"]))
    with (run_dir / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    np.savez(run_dir / "model.npz", **params)  # the trained weights, to evaluate offline
    write_report(records, summary, run_dir / "report.png")
    return summary, run_dir


def _follow(workers: list[Child], servers: list[Child], follower: _Follower, total: int,
            progress: Progress | None) -> list[dict]:
    """Watch the run until every worker has exited; fail at the first process that dies."""
    latest: dict[int, float] = {}  # worker -> its latest loss
    first, last, samples = float("inf"), 0.0, 0
    while True:
        for r in follower.poll():
            latest[r["worker"]] = r["loss"]
            first, last = min(first, r["pulled"]), max(last, r["time"])
            samples += r["samples"]
        if progress is not None and latest:
            rate = samples / (last - first) if last > first else 0.0
            progress(len(follower.records), total, latest, rate)
        for child in servers:
            if not child.alive():
                raise LaunchError(f"{child.name} exited with code {child.proc.returncode}; "
                                  f"its log ends:\n{child.tail()}")
        for child in workers:
            code = child.proc.poll()
            if code not in (None, 0):
                raise LaunchError(f"{child.name} failed with exit code {code}; its log ends:\n"
                                  f"{child.tail()}")
        if all(not c.alive() for c in workers):
            follower.poll()
            return follower.records
        time.sleep(_POLL_S)  # a monitoring interval, not synchronisation


def _finish(config: LaunchConfig, data: Dataset, placement: Placement, addresses: list[str],
            records: list[dict], steps: int, started: float) -> tuple[dict, dict]:
    """Counters and the final model from the servers, evaluated here; then stop the servers."""
    with PSClient(addresses, token=config.token, tls=config.tls(client=True)) as client:
        stats = client.stats()
        params = client.pull()
        client.shutdown()
    model = MLP((data.n_features, *config.hidden, data.n_classes))
    test_loss, test_accuracy = model.evaluate(params, data.X_test, data.y_test)
    summary = build_summary(config, records, stats, test_loss, test_accuracy, placement,
                            time.time() - started, steps, len(data.X_train))
    return summary, params
