"""The Python API that notebooks use: run a whole cluster, or keep one up for hands-on cells.

    summary, run_dir = tinyps.launch(workers=2, mode="async", epochs=5)

    with tinyps.cluster(servers=2, workers=1) as c:    # servers only: you are the worker
        client = c.client()
        client.init(params, "sgd", lr=0.1)
        ...

Both take the settings of `tinyps launch` (LaunchConfig) and always stop their processes.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from ps.client import PSClient
from tinyps.config import LaunchConfig
from tinyps.launcher import launch as _launch
from tinyps.local_backend import start_servers
from tinyps.outcome import outcome
from tinyps.plan import LaunchPlan
from tinyps.processes import Child, end_all
from tinyps.progress import StepBar
from tinyps.rundir import prepare_run_dir, write_config
from tinyps.status import status_table

__all__ = ["Cluster", "RunResult", "cluster", "launch"]


class RunResult(NamedTuple):
    """What a finished run gives back: `summary, run_dir = tinyps.launch(...)`; and what
    happened, as `tinyps launch` would exit: `exit_code` (0: trained as asked; see
    tinyps.outcome) and `outcome` (one line)."""

    summary: dict  # summary.json
    run_dir: Path

    @property
    def exit_code(self) -> int:
        return outcome(self.summary)[0]

    @property
    def outcome(self) -> str:
        return outcome(self.summary)[1]

    @property
    def ok(self) -> bool:
        """Trained as asked: no worker lost, no divergence."""
        return self.exit_code == 0

    @property
    def test_curve(self) -> list[dict]:
        """The held-out curve, from metrics.jsonl: one {"step", "time", "train_s",
        "test_accuracy", "test_loss", "eval_s"} per evaluation during training (see
        eval_every), in step order; the final model's figures are summary["test_accuracy"]
        and ["test_loss"]. train_s is the training time before the weights evaluated were
        pulled, the evaluations before it left out: the time axis of `tinyps train`'s curve,
        so that a run and its baseline compare."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        start = min((r["pulled"] for r in rows), default=0.0)
        curve, evaluating = [], 0.0
        for r in sorted((r for r in rows if r.get("test_accuracy") is not None),
                        key=lambda r: r["step"]):
            curve.append({"step": r["step"], "time": r["time"],
                          "train_s": r["pulled"] - start - evaluating,
                          "test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"],
                          "eval_s": r["eval_s"]})
            evaluating += r["eval_s"]
        return curve


def _config(config: LaunchConfig | None, settings: dict) -> LaunchConfig:
    """A config from another and settings by name (`mode="async"`), which win."""
    if config is None:
        return LaunchConfig.from_flat(settings)
    return config.replace(**settings) if settings else config


def launch(config: LaunchConfig | None = None, *, progress: bool = False,
           **settings) -> RunResult:
    """Run a cluster to the end, as `tinyps launch` does; return (summary, run directory),
    whose exit_code and outcome say whether it trained as asked (a worker lost for good, a
    model that diverged). After a Ctrl-C: raises tinyps.LaunchInterrupted (a
    KeyboardInterrupt), having written summary.json (interrupted: true) and model.npz.

    Settings are those of `tinyps launch` by name (mode="async", epochs=5, ...), given as a
    config, as keywords, or both (keywords win). progress=True shows a progress bar (tqdm's,
    which notebooks render as a widget or text).
    """
    config = _config(config, settings)
    if not progress:
        return RunResult(*_launch(config, on_plan=_warn))
    with StepBar(config.mode, notebook=True, rate=False) as bar:
        return RunResult(*_launch(config, progress=bar, on_event=bar.note, on_plan=_warn))


def _warn(plan: LaunchPlan) -> None:
    """What the terminal would print before a run (rows dropped, a resume's fallback, too
    many processes), as Python warnings: a notebook shows them above the cell's output."""
    for note in (*plan.resume_notes, *plan.warnings):
        warnings.warn(note, UserWarning, stacklevel=4)


class Cluster:
    """Parameter servers running as processes on this machine, with no workers: you are one.

    Use it as a context manager (or call close()): the servers always stop.
    """

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.run_dir = (Path(config.run_dir) if config.run_dir
                        else Path("runs") / f"{stamp}-cluster-{config.mode}")
        prepare_run_dir(self.run_dir)
        # Marks the folder as a tinyps run's, so that the next cluster may reuse it.
        write_config(self.run_dir, config.to_json())
        self._children: list[Child]
        self._children, self.addresses = start_servers(config, self.run_dir)
        self._clients: list[PSClient] = []

    def client(self, worker_id: int = 0, **options) -> PSClient:
        """A PSClient of these servers as worker `worker_id` (closed with the cluster)."""
        options.setdefault("token", self.config.security.token)
        options.setdefault("tls", self.config.tls(client=True))
        client = PSClient(self.addresses, worker_id=worker_id, **options)
        self._clients.append(client)
        return client

    def stats(self) -> list[dict]:
        with PSClient(self.addresses, token=self.config.security.token,
                      tls=self.config.tls(client=True)) as client:
            return client.stats()

    def status(self) -> str:
        """The `tinyps status` table, once."""
        return status_table(self.stats())

    def close(self) -> None:
        for client in self._clients:
            client.close()
        end_all(self._children)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cluster(config: LaunchConfig | None = None, **settings) -> Cluster:
    """Start the servers of a LaunchConfig (keywords as in launch) and return them running."""
    return Cluster(_config(config, settings))
