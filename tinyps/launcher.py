"""The launcher: a whole cluster from start to report, with nothing left behind.

`launch(config)` settles the run (tinyps.plan), starts its servers and workers on a backend
(this machine's processes, or Ray actors), lets the supervisor follow them to the end (a dead
server is restarted on its address from its last checkpoint, a killed worker rejoins), takes
the trained model from the servers, writes the run directory (tinyps.rundir) and stops every
process: on success, on failure and on Ctrl-C alike.
"""

from __future__ import annotations

from pathlib import Path

from tinyps.config import LaunchConfig
from tinyps.local_backend import LocalBackend
from tinyps.plan import LaunchError, LaunchPlan, model_placement, prepare_launch
from tinyps.rundir import load_model, write_results
from tinyps.supervisor import Backend, Progress, Supervisor

__all__ = ["LaunchError", "Progress", "launch", "load_model", "model_placement"]


def _backend(plan: LaunchPlan) -> Backend:
    if plan.config.backend == "ray":
        from tinyps.ray_backend import RayBackend  # Ray is an optional extra

        return RayBackend(plan)
    return LocalBackend(plan)


def launch(config: LaunchConfig, progress: Progress | None = None) -> tuple[dict, Path]:
    """Run a cluster to the end; return (summary, run directory)."""
    plan = prepare_launch(config)
    backend = _backend(plan)
    supervisor = Supervisor(plan, backend)
    try:
        supervisor.start()
        records = supervisor.run(progress)
        summary, params = supervisor.finish(records)
    finally:
        backend.close()
    write_results(plan.run_dir, records, summary, params, plan.config, plan.data,
                  plan.placement)
    return summary, plan.run_dir
