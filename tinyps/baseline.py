"""`tinyps train`: the single-process baseline, with a run directory like a launch's.

The same model, data, optimizer and defaults as a launch (worker.settings.TrainConfig), so
that a distributed run and its baseline are like for like; the run directory holds
config.json, metrics.jsonl (one line per step), summary.json and model.npz.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from ps.schedule import check_fits
from ps.settings import to_flat
from tinyps.rundir import prepare_run_dir, save_model, write_config
from worker.baseline import StepCallback, TrainResult, planned_steps, train_single_process
from worker.data import load_dataset
from worker.evaluate import Measurement
from worker.model_spec import build_model
from worker.settings import TrainConfig

__all__ = ["run_baseline"]


def run_baseline(config: TrainConfig, run_dir: Path | str | None = None,
                 on_step: StepCallback | None = None) -> tuple[TrainResult, Path]:
    """Train in this process and write the run directory: (result, run directory)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{stamp}-train"
    data = load_dataset(config.dataset, seed=config.seed)  # a bad name fails before any file
    build_model(config, data.n_features, data.image_shape, data.n_classes)  # and a bad model
    check_fits(config.lr_schedule, planned_steps(config, len(data.X_train)))
    prepare_run_dir(run_dir)
    write_config(run_dir, {"command": "train", **to_flat(config)})
    started = time.monotonic()
    with (run_dir / "metrics.jsonl").open("w") as metrics:
        held_out: dict = {}  # the step's held-out figures, if it was evaluated

        def evaluated(step: int, measured: Measurement) -> None:
            held_out.update(measured.as_dict())

        def record(step: int, total: int, loss: float) -> None:
            metrics.write(json.dumps({"time": time.monotonic() - started, "worker": 0,
                                      "step": step - 1, "loss": loss, **held_out}) + "\n")
            held_out.clear()
            if on_step is not None:
                on_step(step, total, loss)

        result = train_single_process(config, on_step=record, data=data, on_eval=evaluated)
    summary = {"mode": "single_process", "dataset": config.dataset,
               "optimizer": config.optimizer, "lr": config.lr,
               "lr_schedule": config.lr_schedule, "batch_size": config.batch_size,
               "epochs": config.epochs, **result.summary()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    model = build_model(config, data.n_features, data.image_shape, data.n_classes,
                        seed=config.seed)
    save_model(run_dir / "model.npz", result.params, model, None)
    return result, run_dir
