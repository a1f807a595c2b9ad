"""The launcher: a whole cluster from start to report, with nothing left behind.

`launch(config)` settles the run (tinyps.plan), starts its servers and workers on a backend
(this machine's processes, or Ray actors), lets the supervisor follow them to the end (a dead
or frozen server is restarted on its address from its last checkpoint, a killed worker
rejoins), takes the trained model from the servers, writes the run directory
(tinyps.rundir) and stops every process: on success, on failure and on Ctrl-C alike. After a
Ctrl-C it writes what it has (summary.json marked interrupted, model.npz when the servers
answer) and raises LaunchInterrupted, which says how to resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tinyps.config import LaunchConfig
from tinyps.local_backend import LocalBackend
from tinyps.outcome import LaunchInterrupted, resume_command
from tinyps.plan import LaunchError, LaunchPlan, model_placement, prepare_launch, read_resumed
from tinyps.rundir import load_model, remove_addresses, write_results
from tinyps.supervisor import Backend, Events, Progress, Supervisor, resumed_step
from worker.data import load_dataset
from worker.process import steps_for

__all__ = ["LaunchError", "LaunchInterrupted", "Progress", "check_left_to_train", "launch",
           "load_model", "model_placement"]


def _backend(plan: LaunchPlan) -> Backend:
    if plan.config.backend == "ray":
        from tinyps.ray_backend import RayBackend  # Ray is an optional extra

        return RayBackend(plan)
    return LocalBackend(plan)


def check_left_to_train(config: LaunchConfig) -> None:
    """A resume whose checkpoints already hold every step asked for has nothing to train:
    refused (ValueError) before anything is written or started."""
    if config.resume is None:
        return
    train = config.train
    done = resumed_step(read_resumed(config), config.mode)
    data = load_dataset(train.dataset, seed=train.seed)
    steps = train.steps or steps_for(len(data.X_train), config.workers, train.batch_size,
                                     train.epochs)
    if done >= steps:
        asked = f"--steps {train.steps}" if train.steps else f"--epochs {train.epochs}"
        raise ValueError(
            f"resume: {config.resume} holds {done} steps per worker already and this run asks "
            f"for {steps} ({asked}): nothing left to train. Raise --epochs or --steps (the "
            f"steps count from the start of the first run, so more than {done})")


def _end_every_process(backend: Backend) -> None:
    """backend.close(), which a Ctrl-C (KeyboardInterrupt) cannot cut short: asked again,
    the processes are killed at once rather than given time to stop."""
    grace = 5.0
    while True:
        try:
            backend.close(grace)
            return
        except KeyboardInterrupt:
            grace = 0.0


def _write(plan: LaunchPlan, records: list[dict], summary: dict, params: dict | None) -> None:
    try:
        write_results(plan.run_dir, records, summary, params, plan.config, plan.data,
                      plan.placement)
    except OSError as err:
        raise LaunchError(f"cannot write the run's results to the run directory "
                          f"{plan.run_dir}: {err.strerror or err} ({err.filename}); free "
                          f"space there or choose another --run-dir") from None


def _interrupted(plan: LaunchPlan, summary: dict) -> LaunchInterrupted:
    checkpoints = plan.checkpoints
    # A run's checkpoints are in RUN_DIR/checkpoints unless --checkpoint-dir put them
    # elsewhere: then --resume takes that folder itself.
    inside = checkpoints.parent.resolve() == plan.run_dir.resolve()
    command = resume_command(plan.config, plan.run_dir if inside else checkpoints)
    notes = summary.get("interrupt_notes", [])
    message = (f"interrupted after {summary['steps_done']} steps (of "
               f"{summary['steps_this_launch']} x {plan.config.workers}); summary.json"
               + ("" if summary.get("test_accuracy") is None else " and model.npz")
               + f" written to {plan.run_dir}"
               + "".join(f"; {n}" for n in notes)
               + f".\nTo go on from the servers' checkpoints: {command}")
    summary["resume_command"] = command
    return LaunchInterrupted(summary, plan.run_dir, message)


def _prepare(config: LaunchConfig) -> LaunchPlan:
    """prepare_launch, with a run directory that cannot be written said as such."""
    try:
        return prepare_launch(config)
    except OSError as err:
        where = Path(config.run_dir) if config.run_dir else Path("runs")
        target = Path(err.filename).resolve() if err.filename else None
        if target is None or (target != where.resolve()
                              and where.resolve() not in target.parents):
            raise
        raise LaunchError(f"cannot write the run directory {where}: {err.strerror or err} "
                          f"({err.filename}); choose another --run-dir") from None


def launch(config: LaunchConfig, progress: Progress | None = None,
           on_event: Events | None = None,
           on_plan: Callable[[LaunchPlan], None] | None = None) -> tuple[dict, Path]:
    """Run a cluster to the end; return (summary, run directory). `on_plan` is shown the run
    once it is settled and checked, before any process starts (the placement, the warnings);
    `on_event` is told each fault event as it happens. Raises LaunchInterrupted (a
    KeyboardInterrupt) after a Ctrl-C, once what the run had is written."""
    check_left_to_train(config)
    plan = _prepare(config)
    if on_plan is not None:
        on_plan(plan)
    backend = _backend(plan)
    supervisor = Supervisor(plan, backend, on_event=on_event)
    interrupted = finished = False
    try:
        try:
            supervisor.start()
            supervisor.run(progress)
            summary, params = supervisor.finish()
            finished = True
        except KeyboardInterrupt:
            interrupted = True
            summary, params = supervisor.salvage()
    finally:
        _end_every_process(backend)
        if not finished:  # the servers are gone: their addresses would mislead
            remove_addresses(plan.run_dir)
    if interrupted:
        error = _interrupted(plan, summary)
        _write(plan, supervisor.records, summary, params)
        raise error
    _write(plan, supervisor.records, summary, params)
    return summary, plan.run_dir
