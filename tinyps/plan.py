"""A run settled before anything starts: its data, placement, steps, DP plan and resume.

Every backend calls `prepare_launch` first: it checks everything that can be checked, then
writes the run directory and config.json, re-splits a resumed run's checkpoints over this
run's servers, and warms Numba's cache for the processes that follow.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ps.checkpoint import list_checkpoints, server_directory, write_checkpoint
from ps.checkpoint_set import MANIFEST, ResumePoint, resume_point
from ps.consistency import make_rule
from ps.keys import cut
from ps.placement import Placement, TensorSpec
from ps.resplit import resplit
from ps.schedule import check_fits
from ps.snapshot import Snapshot
from tinyps import privacy
from tinyps.config import LaunchConfig
from tinyps.rundir import prepare_run_dir, write_config
from worker.data import Dataset, load_dataset
from worker.model_spec import build_model
from worker.process import steps_for
from worker.shards import partition

__all__ = ["LaunchError", "LaunchPlan", "check_every_server_holds_something", "checkpoint_root",
           "launch_warnings", "model_placement", "prepare_launch", "read_resume_point",
           "read_resumed", "resume_into", "warm_numba_cache"]


class LaunchError(RuntimeError):
    """A run that could not start or did not finish; says which process and why."""


def model_placement(config: LaunchConfig, data: Dataset) -> Placement:
    """The placement every worker computes for this model (the same pure function)."""
    model = build_model(config.train, data.n_features, data.image_shape, data.n_classes)
    specs = [TensorSpec(name, shape) for name, shape in model.param_shapes().items()]
    return config.placement.place(specs, config.servers)


def _empty_servers(placement: Placement) -> str | None:
    """The servers a placement leaves without a tensor, as a short list; None if none."""
    empty = [i for i, load in enumerate(placement.bytes_per_server()) if load == 0]
    if not empty:
        return None
    return ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more"
                                              if len(empty) > 5 else "")


def check_every_server_holds_something(config: LaunchConfig, placement: Placement) -> None:
    """More servers than the model has parts to place: some would hold nothing whatever the
    placement, each costing a process, a port and every worker's calls. Refuse, and say how
    many servers this model can use. (A placement that leaves a server empty by choice, say
    every tensor on server 0 to compare with a spread, is warned of: launch_warnings.)"""
    parts = len(placement.parts)
    if parts >= config.servers or (empty := _empty_servers(placement)) is None:
        return
    raise ValueError(
        f"--servers {config.servers}: the model has {parts} parts to place (tensors, or row "
        f"ranges of those over --split-bytes), so servers {empty} would hold nothing; use at "
        f"most {parts} servers, or a smaller --split-bytes to cut big tensors into row ranges")


_PROCESSES_PER_CORE = 4  # beyond this many processes per core, a launch is warned


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


def launch_warnings(config: LaunchConfig, data: Dataset) -> tuple[str, ...]:
    """What a user should hear before the run starts, though it may go on."""
    warnings = []
    if (empty := _empty_servers(model_placement(config, data))) is not None:
        warnings.append(f"placement {config.placement.placement}: servers {empty} hold "
                        f"nothing: each is a process (and a port) that does no work")
    if data.dropped_rows:
        warnings.append(f"{config.train.dataset}: {data.dropped_rows} rows dropped for NaN or "
                        f"±inf values (`tinyps data-report {config.train.dataset}` lists the "
                        f"data set's problems)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    servers, workers = config.servers, config.workers
    processes = servers + workers
    # A few processes per core is what a lab on a laptop looks like; far more only measures
    # how the scheduler shares the cores out.
    if config.backend == "local" and cores and processes > _PROCESSES_PER_CORE * cores:
        warnings.append(f"{processes} processes ({_count(servers, 'server')}, "
                        f"{_count(workers, 'worker')}) on {_count(cores, 'core')}: they take "
                        f"turns on the cores, so this run measures the scheduler more than "
                        f"training, and runs slower than fewer processes would")
    return tuple(warnings)


def warm_numba_cache() -> None:
    """Compile (or load) every kernel once here, so that the workers find them cached."""
    import kernels.warmup

    kernels.warmup.warm_up()


def checkpoint_root(config: LaunchConfig, run_dir: Path) -> Path:
    """Where the run's servers keep their checkpoints, each in a folder of its own; cleared
    of an earlier run's, which a restart would take for this run's."""
    chosen = config.checkpoint.checkpoint_dir
    root = Path(chosen) if chosen else run_dir / "checkpoints"
    for folder in root.glob("server*"):
        for path in list_checkpoints(folder):
            path.unlink()
    (root / MANIFEST).unlink(missing_ok=True)
    return root


def read_resume_point(config: LaunchConfig) -> ResumePoint:
    """The newest round of checkpoints of the run resumed that every one of its servers holds
    readable (ps/checkpoint_set.py), with a note for each newer round passed over; checked
    against this run before anything is written."""
    point = resume_point(config.resume_checkpoints())
    old = point.snapshots
    if (old[0].mode, old[0].workers) != (config.mode, config.workers):
        raise ValueError(f"resume: {config.resume} is a {old[0].mode} run of {old[0].workers} "
                         f"workers; this run must be the same (got {config.mode}, "
                         f"{config.workers} workers)")
    return point


def read_resumed(config: LaunchConfig) -> list[Snapshot]:
    """The checkpoints of every server of the run resumed, all of one round (see
    read_resume_point)."""
    return read_resume_point(config).snapshots


def resume_into(config: LaunchConfig, old: list[Snapshot], placement: Placement,
                root: Path) -> None:
    """Write the checkpoints this run's servers start from: the resumed run's newest,
    re-split over this run's placement (which may have another number of servers)."""
    keys = cut(placement)  # the keys every worker cuts (PSClient's default chunk size)
    for i in range(config.servers):
        snapshot = resplit(old, keys[i])
        snapshot.counters = {}  # this run counts its own work
        write_checkpoint(server_directory(root, i), snapshot,
                         config.checkpoint.keep_checkpoints)


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
    # A resume: the round resumed from, and what a user must hear about it (each newer round
    # passed over: its file and why), for the terminal and summary.json.
    resume_round: int | None = None
    resume_notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # for the terminal before the run starts (launch_warnings)


def prepare_launch(config: LaunchConfig) -> LaunchPlan:
    """Check and settle a run before anything starts: the data, the placement, the steps,
    the DP plan, a resume's checkpoints; then write the run directory and config.json, and
    warm Numba's cache for the processes that follow. Shared by every backend."""
    started = time.time()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run_dir) if config.run_dir else config.default_run_dir(stamp)
    point = read_resume_point(config) if config.resume else None
    resumed = point.snapshots if point is not None else None
    train = config.train
    data = load_dataset(train.dataset, seed=train.seed)
    placement = model_placement(config, data)  # builds the model: a spec that does not fit fails
    check_every_server_holds_something(config, placement)
    steps = train.steps or steps_for(len(data.X_train), config.workers, train.batch_size,
                                     train.epochs)
    rule = make_rule(config.store.mode, config.store.staleness)
    check_fits(train.lr_schedule, steps * rule.updates_per_step(config.workers))
    shard_sizes = [len(s) for s in partition(data, config.workers, config.split.partition,
                                             alpha=config.split.alpha, seed=train.seed)]
    if config.privacy.on:
        build_model(config.train, data.n_features, data.image_shape, data.n_classes).check_dp()
    config = privacy.plan(config, shard_sizes, steps)  # sigma settled before anything starts
    if resumed is not None:
        privacy.check_resume(config, Path(config.resume))
    prepare_run_dir(run_dir)  # every check has passed: nothing is written before this
    write_config(run_dir, config.to_json())
    checkpoints = checkpoint_root(config, run_dir).resolve()
    if resumed is not None:
        resume_into(config, resumed, placement, checkpoints)
    warm_numba_cache()  # for the processes on this machine; other hosts compile their own
    return LaunchPlan(config, run_dir, data, placement, steps, shard_sizes, checkpoints,
                      resumed, started, None if point is None else point.step,
                      () if point is None else tuple(point.notes),
                      launch_warnings(config, data))
