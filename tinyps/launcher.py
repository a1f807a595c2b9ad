"""The launcher: a whole cluster on this machine, from start to report, with nothing left behind.

It starts S server processes and waits for their health checks, starts W worker processes,
follows their metrics into one progress bar, and supervises them: a dead server is restarted
on its address from its last checkpoint, a killed worker is reported to the servers and
restarted. At the end it evaluates the trained model, writes the run directory (config.json,
metrics.jsonl, summary.json, model.npz, logs/, report.png) and stops every process: on
success, on failure and on Ctrl-C alike.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ps.checkpoint import (
    latest_checkpoint,
    latest_set,
    list_checkpoints,
    resplit,
    server_directory,
    write_checkpoint,
)
from ps.client import PSClient, wait_healthy
from ps.keys import cut
from ps.memory import keep_freed_buffers
from ps.placement import Placement, TensorSpec, place
from ps.snapshot import Snapshot
from tinyps import privacy
from tinyps.config import LaunchConfig
from tinyps.processes import TOKEN_ENV, Child, end_all, start_child, thread_env
from tinyps.report import write_report
from tinyps.summary import build_summary
from worker.data import Dataset, load_dataset
from worker.model import MLP
from worker.partition import partition
from worker.process import steps_for

__all__ = ["Follower", "LaunchError", "LaunchPlan", "Progress", "checkpoint_root", "launch",
           "load_model", "prepare_launch", "prepare_run_dir", "read_resumed", "resume_into",
           "save_model", "server_args", "start_servers", "warm_numba_cache", "worker_args",
           "write_results"]

# Progress(steps done, steps in all, latest loss per worker, samples per second)
Progress = Callable[[int, int, dict[int, float], float], None]

_POLL_S = 0.05  # how often the launcher looks at its children and their metrics


class LaunchError(RuntimeError):
    """A run that could not start or did not finish; says which process and why."""


@dataclass
class Follower:
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


def server_args(config: LaunchConfig, ready_file: Path | None, checkpoints: Path | None = None,
                index: int = 0, port: int = 0, restore: bool = False,
                host: str | None = None) -> list[str]:
    """The command line of server `index`: checkpoints, if given, go to its own folder of
    `checkpoints`; restore starts it from the newest one there."""
    args = ["server", "--host", host or config.host, "--port", str(port), "--mode",
            config.mode, "--workers", str(config.workers), "--staleness", str(config.staleness),
            "--backup-workers", str(config.backup_workers), "--aggregate", config.aggregate,
            "--lease", repr(config.lease_s)]
    if ready_file is not None:
        args += ["--ready-file", str(ready_file)]
    if config.staleness_lr:
        args.append("--staleness-lr")
    if config.max_staleness is not None:
        args += ["--max-staleness", str(config.max_staleness)]
    if (dp := config.dp_config()) is not None and dp.noise_at == "server":
        # Noise on the sum of the workers' pushes, each a clipped sum / expected batch.
        args += ["--dp-noise-std", repr(dp.noise * dp.clip / config.batch_size)]
        if dp.seed is not None:
            args += ["--dp-seed", str(dp.seed)]
    if checkpoints is not None:
        args += ["--checkpoint-dir", str(server_directory(checkpoints, index)),
                 "--checkpoint-every", str(config.checkpoint_every),
                 "--keep-checkpoints", str(config.keep_checkpoints)]
        if restore:
            args.append("--restore")
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


def worker_args(config: LaunchConfig, index: int, addresses: list[str], steps: int | None,
                metrics: Path | None = None, start_time: float | None = None) -> list[str]:
    """The command line of worker `index` (steps None: the config's epochs; metrics: where
    its step records go)."""
    args = ["worker", "--servers", ",".join(addresses), "--index", str(index),
            "--workers", str(config.workers), "--dataset", config.dataset,
            "--hidden", ",".join(map(str, config.hidden)),
            *(["--epochs", str(config.epochs)] if steps is None else ["--steps", str(steps)]),
            "--batch-size", str(config.batch_size), "--lr", repr(config.lr),
            "--optimizer", config.optimizer, "--momentum", repr(config.momentum),
            "--placement", config.placement, "--partition", config.partition,
            "--alpha", repr(config.alpha), "--slowdown", repr(config.slowdown(index)),
            "--seed", str(config.seed), "--precision", config.precision,
            "--loss-scale", str(config.loss_scale), "--init-scale", repr(config.init_scale),
            "--growth-interval", str(config.growth_interval)]
    if metrics is not None:
        args += ["--metrics", str(metrics)]
    if start_time is not None:
        args += ["--start-time", repr(start_time)]
    if index < config.poison_workers:
        args += ["--poison", config.poison]
    if (dp := config.dp_config()) is not None:
        args += ["--dp-noise", repr(dp.noise), "--dp-clip", repr(dp.clip),
                 "--dp-delta", repr(dp.delta), "--dp-noise-at", dp.noise_at]
        if dp.seed is not None:
            args += ["--dp-seed", str(dp.seed)]
    if config.split_bytes is not None:
        args += ["--split-bytes", str(config.split_bytes)]
    if not config.fused:
        args.append("--no-fused")
    if not config.shared_memory:
        args.append("--no-shared-memory")
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


def _start_server(config: LaunchConfig, run_dir: Path, index: int,
                  checkpoints: Path | None, port: int = 0, restore: bool = False
                  ) -> tuple[Child, Path]:
    ready_file = run_dir / f"server{index}.address"
    ready_file.unlink(missing_ok=True)
    child = start_child(f"server{index}",
                        server_args(config, ready_file, checkpoints, index, port, restore),
                        run_dir / "logs" / f"server{index}.log", _child_env(config))
    return child, ready_file


def _healthy(config: LaunchConfig, children: list[Child], ready: list[Path]) -> list[str]:
    addresses = _wait_ready(children, ready, config.startup_timeout_s)
    unhealthy = wait_healthy(addresses, config.startup_timeout_s, config.tls(client=True))
    if unhealthy:
        raise LaunchError(f"servers not serving: {', '.join(unhealthy)}")
    return addresses


def start_servers(config: LaunchConfig, run_dir: Path, checkpoints: Path | None = None,
                  restore: bool = False) -> tuple[list[Child], list[str]]:
    """Start the servers of a run and wait until each is healthy: (children, addresses)."""
    children, ready = [], []
    try:
        for i in range(config.servers):
            child, ready_file = _start_server(config, run_dir, i, checkpoints, restore=restore)
            children.append(child)
            ready.append(ready_file)
        return children, _healthy(config, children, ready)
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


def warm_numba_cache() -> None:
    """Compile (or load) every kernel once here, so that the workers find them cached."""
    import kernels.warmup

    kernels.warmup.warm_up()


def checkpoint_root(config: LaunchConfig, run_dir: Path) -> Path:
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    # Checkpoints of an earlier run there would be taken for this run's by a restart.
    for folder in root.glob("server*"):
        for path in list_checkpoints(folder):
            path.unlink()
    return root


def read_resumed(config: LaunchConfig) -> list[Snapshot]:
    """The newest checkpoint of every server of the run resumed, checked against this run
    before anything is written."""
    old = latest_set(config.resume_checkpoints())
    if (old[0].mode, old[0].workers) != (config.mode, config.workers):
        raise ValueError(f"resume: {config.resume} is a {old[0].mode} run of {old[0].workers} "
                         f"workers; this run must be the same (got {config.mode}, "
                         f"{config.workers} workers)")
    return old


def resume_into(config: LaunchConfig, old: list[Snapshot], placement: Placement,
                 root: Path) -> None:
    """Write the checkpoints this run's servers start from: the resumed run's newest,
    re-split over this run's placement (which may have another number of servers)."""
    keys = cut(placement)  # the keys every worker cuts (PSClient's default chunk size)
    for i in range(config.servers):
        snapshot = resplit(old, keys[i])
        snapshot.counters = {}  # this run counts its own work
        write_checkpoint(server_directory(root, i), snapshot, config.keep_checkpoints)


@dataclass(frozen=True)
class LaunchPlan:
    """What every backend settles before it starts a process (see prepare_launch)."""

    config: LaunchConfig  # with the DP noise settled
    run_dir: Path
    data: Dataset
    placement: Placement
    steps: int  # per worker
    shard_sizes: list[int]
    checkpoints: Path  # absolute: a Ray actor's working directory may be another
    resumed: list[Snapshot] | None  # the resumed run's newest checkpoints, or None
    started: float  # time.time() when the launch began


def prepare_launch(config: LaunchConfig) -> LaunchPlan:
    """Check and settle a run before anything starts: the data, the placement, the steps,
    the DP plan, a resume's checkpoints; then write the run directory and config.json, and
    warm Numba's cache for the processes that follow. Shared by every backend."""
    started = time.time()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir) if config.run_dir else config.default_run_dir(stamp)
    resumed = read_resumed(config) if config.resume else None
    data = load_dataset(config.dataset, seed=config.seed)
    placement = model_placement(config, data)
    steps = config.steps or steps_for(len(data.X_train), config.workers, config.batch_size,
                                      config.epochs)
    shard_sizes = [len(s) for s in partition(data, config.workers, config.partition,
                                             alpha=config.alpha, seed=config.seed)]
    config = privacy.plan(config, shard_sizes, steps)  # sigma settled before anything starts
    if resumed is not None:
        privacy.check_resume(config, Path(config.resume))
    prepare_run_dir(run_dir)  # every check has passed: nothing is written before this
    (run_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    checkpoints = checkpoint_root(config, run_dir).resolve()
    if resumed is not None:
        resume_into(config, resumed, placement, checkpoints)
    warm_numba_cache()  # for the processes on this machine; other hosts compile their own
    return LaunchPlan(config, run_dir, data, placement, steps, shard_sizes, checkpoints,
                      resumed, started)


def launch(config: LaunchConfig, progress: Progress | None = None) -> tuple[dict, Path]:
    """Run a cluster to the end; return (summary, run directory)."""
    if config.backend == "ray":
        from tinyps.ray_backend import launch_ray  # Ray is an optional extra

        return launch_ray(config, progress, config.ray_address)
    keep_freed_buffers()
    plan = prepare_launch(config)
    config = plan.config
    run = _Run(config, plan.run_dir, plan.checkpoints, plan.steps, plan.started)
    try:
        run.servers, run.addresses = start_servers(config, plan.run_dir, plan.checkpoints,
                                                   restore=config.resume is not None)
        run.workers = [run.start_worker(i) for i in range(config.workers)]
        records = run.supervise(progress)
        summary, params = _finish(config, plan.data, plan.placement, run, records, plan.steps,
                                  plan.started)
        summary.update(privacy.spent(config, plan.shard_sizes,
                                     privacy.steps_made(records, config.workers,
                                                        resumed=plan.resumed is not None)))
    finally:
        end_all(run.servers + run.workers)

    write_results(plan.run_dir, records, summary, params, config, plan.data, plan.placement)
    return summary, plan.run_dir


def write_results(run_dir: Path, records: list[dict], summary: dict, params: dict,
                  config: LaunchConfig, data: Dataset, placement: Placement) -> None:
    """What a finished run leaves: metrics.jsonl (in time order), summary.json, model.npz
    and report.png. Every backend writes them here, so that their run directories agree."""
    records.sort(key=lambda r: (r["time"], r["worker"]))
    with (run_dir / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_model(run_dir / "model.npz", params, config, data, placement)
    write_report(records, summary, run_dir / "report.png")


def save_model(path: Path, params: dict, config: LaunchConfig, data: Dataset,
                placement: Placement) -> None:
    """The trained weights, with the layer sizes and the placement they were trained under:
    enough to evaluate the model, or see where its parts lived, without a cluster."""
    sizes = np.array([data.n_features, *config.hidden, data.n_classes], np.int64)
    np.savez(path, **params, __sizes__=sizes,
             __placement__=np.array(json.dumps(placement.as_summary())))


def load_model(path: Path | str) -> tuple[MLP, dict[str, np.ndarray], dict]:
    """A saved model (model.npz of a run directory, or the directory): (model, params,
    placement as summary.json shows it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.npz"
    with np.load(path, allow_pickle=False) as saved:
        params = {name: saved[name] for name in saved.files if not name.startswith("__")}
        sizes = tuple(int(n) for n in saved["__sizes__"])
        placement = json.loads(str(saved["__placement__"]))
    return MLP(sizes), params, placement


@dataclass
class _Run:
    """The processes of one run, and the supervision that keeps them going."""

    config: LaunchConfig
    run_dir: Path
    checkpoints: Path
    steps: int
    started: float
    servers: list[Child] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)
    restarts: int = 0
    lost_workers: list[int] = field(default_factory=list)  # killed, not restarted
    events: list[str] = field(default_factory=list)  # faults seen and what was done

    def metrics(self, index: int) -> Path:
        return self.run_dir / "metrics" / f"worker{index}.jsonl"

    def start_worker(self, index: int) -> Child:
        args = worker_args(self.config, index, self.addresses, self.steps,
                            self.metrics(index), self.started)
        return start_child(f"worker{index}", args, self.run_dir / "logs" / f"worker{index}.log",
                           _child_env(self.config))

    def supervise(self, progress: Progress | None) -> list[dict]:
        """Watch the run until every worker has finished or is lost; restart what dies."""
        config = self.config
        follower = Follower([self.metrics(i) for i in range(config.workers)])
        total = self.steps * config.workers
        latest: dict[int, float] = {}  # worker -> its latest loss
        seen: dict[int, float] = {}  # worker -> when its latest record arrived
        first, last, samples = float("inf"), 0.0, 0
        pending_kills = [k for k in (("server", config.kill_server),
                                     ("worker", config.kill_worker)) if k[1] is not None]
        while True:
            for r in follower.poll():
                latest[r["worker"]] = r["loss"]
                seen[r["worker"]] = time.monotonic()
                first, last = min(first, r["pulled"]), max(last, r["time"])
                samples += r["samples"]
            if progress is not None and latest:
                rate = samples / (last - first) if last > first else 0.0
                progress(len(follower.records), total, latest, rate)
            for kind, (index, after) in list(pending_kills):
                if len(follower.records) >= after:
                    self._inject_kill(kind, index, len(follower.records))
                    pending_kills.remove((kind, (index, after)))
            for i, child in enumerate(self.servers):
                if not child.alive():
                    self._restart_server(i)
            running = []
            for i, child in enumerate(self.workers):
                code = child.proc.poll()
                if code is None:
                    running.append(i)
                elif code < 0 and i not in self.lost_workers:  # killed by a signal
                    self._worker_died(i, code)
                    if self.workers[i].alive():
                        running.append(i)
                elif code > 0:
                    raise LaunchError(f"{child.name} failed with exit code {code}; its log "
                                      f"ends:\n{child.tail()}")
            if not running:
                follower.poll()
                return follower.records
            self._end_hung(running, seen)
            time.sleep(_POLL_S)  # a monitoring interval, not synchronisation

    def _inject_kill(self, kind: str, index: int, done: int) -> None:
        child = (self.servers if kind == "server" else self.workers)[index]
        if child.alive():
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            self.events.append(f"injected: SIGKILL to {child.name} after {done} steps")

    def _restart_server(self, index: int) -> None:
        """Start a dead server again, on its address, from its newest checkpoint."""
        dead = self.servers[index]
        if self.restarts >= self.config.max_restarts:
            raise LaunchError(f"{dead.name} exited with code {dead.proc.returncode} and the "
                              f"{self.config.max_restarts} restarts are used up; its log "
                              f"ends:\n{dead.tail()}")
        self.restarts += 1
        port = int(self.addresses[index].rsplit(":", 1)[1])
        child, ready = _start_server(self.config, self.run_dir, index, self.checkpoints,
                                     port=port, restore=True)
        self.servers[index] = child
        _healthy(self.config, [child], [ready])
        self.events.append(f"restarted {dead.name} (exit code {dead.proc.returncode}) on "
                           f"{self.addresses[index]} from its checkpoint")

    def _worker_died(self, index: int, code: int) -> None:
        """Tell the servers, so that no barrier waits for it; restart it if we may."""
        name = self.workers[index].name
        with PSClient(self.addresses, token=self.config.token,
                      tls=self.config.tls(client=True)) as client:
            client.leave(index)
        if self.restarts < self.config.max_restarts:
            self.restarts += 1
            self.workers[index] = self.start_worker(index)
            self.events.append(f"restarted {name} (killed by signal {-code}); it rejoins")
        else:
            self.lost_workers.append(index)
            self.events.append(f"{name} killed by signal {-code}: the run goes on without it")

    def _end_hung(self, running: list[int], seen: dict[int, float]) -> None:
        """Once the others are done, a worker silent for a whole lease is hung: end it."""
        if len(running) != 1 or self.config.workers == 1:
            return
        index = running[0]
        quiet = time.monotonic() - seen.get(index, time.monotonic())
        if index in seen and quiet > self.config.lease_s:
            self.workers[index].proc.kill()
            self.workers[index].proc.wait()
            self.lost_workers.append(index)
            self.events.append(f"worker{index} silent for {quiet:.0f} s after the others "
                               f"finished: ended as hung")


def _finish(config: LaunchConfig, data: Dataset, placement: Placement, run: _Run,
            records: list[dict], steps: int, started: float) -> tuple[dict, dict]:
    """Counters and the final model from the servers, evaluated here; then stop the servers
    (each writes a final checkpoint) and count the checkpoints."""
    with PSClient(run.addresses, token=config.token, tls=config.tls(client=True)) as client:
        stats = client.stats()
        params = client.pull()
        client.shutdown()
    for child in run.servers:
        child.proc.wait(config.startup_timeout_s)
    faults = {"restarts": run.restarts,
              "checkpoints_written": sum(_checkpoints_written(run.checkpoints, i)
                                         for i in range(config.servers)),
              "workers_lost": sorted(run.lost_workers), "fault_events": run.events}
    model = MLP((data.n_features, *config.hidden, data.n_classes))
    test_loss, test_accuracy = model.evaluate(params, data.X_test, data.y_test)
    summary = build_summary(config, records, stats, test_loss, test_accuracy, placement,
                            time.time() - started, steps, len(data.X_train), faults)
    return summary, params


def _checkpoints_written(root: Path, server: int) -> int:
    """The count a server keeps in each checkpoint: its newest has the total, restarts and
    the final one included."""
    snapshot = latest_checkpoint(server_directory(root, server))
    return int(snapshot.counters.get("checkpoints_written", 0)) if snapshot else 0
