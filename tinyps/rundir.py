"""A run directory's files: made ready, followed while the run goes, written at its end.

config.json (the settings), metrics/workerN.jsonl (each worker's steps as they happen),
metrics.jsonl (all of them, in time order), summary.json, model.npz (the weights, the model
spec and data shape that rebuild the model, and the placement: `load_model`), report.png and
logs/.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ps.placement import Placement
from tinyps.config import LaunchConfig
from tinyps.report import write_report
from worker.data import Dataset
from worker.model import MLP
from worker.model_spec import build_model
from worker.sequential import Sequential

__all__ = ["Follower", "load_model", "prepare_run_dir", "remove_addresses", "save_model",
           "unwritable", "write_config", "write_results"]

_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.png", "model.npz",
              "*.address", "logs/*.log", "metrics/*.jsonl")


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


def write_config(run_dir: Path, settings: dict) -> None:
    """config.json: the settings by name (no token), which also marks the folder a run's."""
    (run_dir / "config.json").write_text(json.dumps(settings, indent=2) + "\n")


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


def write_results(run_dir: Path, records: list[dict], summary: dict, params: dict | None,
                  config: LaunchConfig, data: Dataset, placement: Placement) -> None:
    """What a finished run leaves: summary.json, model.npz (unless there is no model: an
    interrupted run whose servers did not answer), metrics.jsonl (in time order) and
    report.png. Every backend writes them here, so that their run directories agree. The
    small files that matter most go first, should the disk fill up."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if params is not None:
        model = build_model(config.train, data.n_features, data.image_shape, data.n_classes,
                            seed=config.train.seed)
        save_model(run_dir / "model.npz", params, model, placement)
    records.sort(key=lambda r: (r["time"], r["worker"]))
    with (run_dir / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if summary.get("test_accuracy") is not None:  # the report's title shows it
        write_report(records, summary, run_dir / "report.png")


def remove_addresses(run_dir: Path) -> None:
    """The servers' address files: stale once the servers are gone."""
    for path in run_dir.glob("server*.address"):
        path.unlink(missing_ok=True)


def unwritable(run_dir: Path) -> str | None:
    """Why `run_dir` cannot take a file now (read-only, full, gone), or None if it can."""
    probe = run_dir / ".write-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 4096)  # a page: a full filesystem refuses it
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as err:
        return err.strerror or str(err)
    return None


def save_model(path: Path, params: dict, model: Sequential,
               placement: Placement | None) -> None:
    """The trained weights, with what rebuilds their model (its spec, the data's shape and
    classes, the seed) and the placement they were trained under: enough to evaluate the
    model, or see where its parts lived, without a cluster. An MLP also keeps __sizes__, the
    one record older files have."""
    if model.spec is None:
        raise ValueError("save_model: the model has no spec to rebuild it from (build it with "
                         "worker.model_spec.build_model)")
    where = placement.as_summary() if placement is not None else {}
    shape = model.input_shape[1:] if len(model.input_shape) == 3 else ()
    record = {"spec": model.spec, "n_features": model.n_features,
              "image_shape": list(shape) or None, "n_classes": model.n_classes,
              "seed": model.seed}
    extra = {"__sizes__": np.array(model.sizes, np.int64)} if isinstance(model, MLP) else {}
    np.savez(path, **params, **extra, __model__=np.array(json.dumps(record)),
             __placement__=np.array(json.dumps(where)))


def load_model(path: Path | str) -> tuple[Sequential, dict[str, np.ndarray], dict]:
    """A saved model (model.npz of a run directory, or the directory): (model, params,
    placement as summary.json shows it). Any model: an MLP, a CNN, ..."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.npz"
    with np.load(path, allow_pickle=False) as saved:
        params = {name: saved[name] for name in saved.files if not name.startswith("__")}
        placement = json.loads(str(saved["__placement__"]))
        if "__model__" in saved.files:
            record = json.loads(str(saved["__model__"]))
            image = record["image_shape"]
            model = build_model(record["spec"], record["n_features"],
                                tuple(image) if image else None, record["n_classes"],
                                seed=record["seed"])
        else:  # written before model specs: an MLP, by its layer sizes
            model = MLP(tuple(int(n) for n in saved["__sizes__"]))
    return model, params, placement
