"""The single-process trainer: the baseline that every distributed run is compared with.

Same model, data, kernels and optimizer as a cluster run, with no servers in between, so that
any difference a distributed run shows comes from distribution alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ps.optimizer import Optimizer
from ps.schedule import check_fits
from worker.data import Dataset, augment_shifts, load_dataset
from worker.evaluate import HeldOut, Measurement, eval_interval
from worker.model_spec import build_model
from worker.settings import TrainConfig

__all__ = ["EvalCallback", "StepCallback", "TrainConfig", "TrainResult", "planned_steps",
           "train_single_process"]

# on_step(step, total_steps, loss): called after every update, e.g. to drive a progress bar.
StepCallback = Callable[[int, int, float], None]
# on_eval(step, measurement): the held-out figures at the weights step `step` (1-based, as
# on_step's) started from, told before that step's on_step.
EvalCallback = Callable[[int, Measurement], None]


@dataclass
class TrainResult:
    test_accuracy: float
    test_loss: float
    final_train_loss: float  # mean loss of the last epoch's batches
    steps: int
    wall_s: float
    train_s: float  # wall_s less the held-out evaluations: the time training took
    samples_per_s: float
    params: dict[str, np.ndarray] = field(repr=False)
    epoch_losses: list[float] = field(default_factory=list)
    # The held-out curve: {"step" (0-based), "train_s" (training time before it),
    # "test_accuracy", "test_loss", "eval_s"} per evaluation (config.eval_every), at the
    # weights the step started from.
    test_curve: list[dict] = field(default_factory=list, repr=False)
    eval_s: float = 0.0  # seconds spent on those evaluations (not in samples_per_s)

    def summary(self) -> dict:
        """The result as plain JSON-ready values (no arrays)."""
        return {
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "final_train_loss": self.final_train_loss,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "train_s": self.train_s,
            "samples_per_s": self.samples_per_s,
            "epoch_losses": self.epoch_losses,
            "test_curve": self.test_curve,
        }


def planned_steps(config: TrainConfig, n_train: int) -> int:
    """The steps (= updates) the baseline makes: --steps, else every batch of each epoch."""
    return config.steps or config.epochs * -(-n_train // config.batch_size)


def train_single_process(config: TrainConfig, on_step: StepCallback | None = None,
                         data: Dataset | None = None,
                         on_eval: EvalCallback | None = None) -> TrainResult:
    """Train the model (--model, else an MLP of --hidden) with minibatch SGD/Adam in this
    process and evaluate it on the test split (of `data`, if given: config.dataset loaded
    with config.seed): at the end, and during training every config.eval_every steps
    (default: once per epoch) and at the last."""
    data = data or load_dataset(config.dataset, seed=config.seed)
    model = build_model(config, data.n_features, data.image_shape, data.n_classes,
                        seed=config.seed)
    params = model.init_params()
    rng = np.random.default_rng(config.seed)
    n = len(data.X_train)
    total = planned_steps(config, n)
    check_fits(config.lr_schedule, total)
    optimizer = Optimizer(config.optimizer_config(total), model.param_shapes())
    every = eval_interval(config.eval_every, -(-n // config.batch_size))
    held_out = HeldOut(data.X_test, data.y_test, every) if every and len(data.X_test) else None
    curve: list[dict] = []
    step = 0
    epoch_losses: list[float] = []
    samples = 0
    # One untimed step on copies loads the compiled kernels (the model's and the optimizer's),
    # as a worker's warm-up pass does before its start line, and on a full batch: freeing its
    # large arrays raises glibc's mmap threshold, so that the steps reuse heap memory instead
    # of mapping fresh pages (1.5x slower on a CNN). A rate that counted either would flatter
    # every distributed run compared with this one.
    warm = {name: value.copy() for name, value in params.items()}
    batch = slice(0, config.batch_size)
    _, warm_grads = model.loss_and_grads(warm, data.X_train[batch], data.y_train[batch])
    spare = Optimizer(optimizer.config, model.param_shapes())
    for name, grad in warm_grads.items():
        spare.step(name, warm[name], grad, lr=optimizer.config.lr_at(0))
    start = time.perf_counter()
    while step < total:
        order = rng.permutation(n)
        losses = []
        for first in range(0, n, config.batch_size):
            if step == total:
                break
            idx = order[first : first + config.batch_size]
            X = data.X_train[idx]
            if config.augment and data.image_shape is not None:
                X = augment_shifts(X, data.image_shape, rng)
            if held_out is not None and held_out.due(step, total):
                measured = held_out.measure(model, params)
                # train_s: the training time so far, the evaluations before it left out
                trained = time.perf_counter() - start - sum(point["eval_s"] for point in curve)
                curve.append({"step": step, "train_s": trained - measured.eval_s,
                              **measured.as_dict()})
                if on_eval is not None:
                    on_eval(step + 1, measured)
            loss, grads = model.loss_and_grads(params, X, data.y_train[idx],
                                               loss_scale=config.grad_factor(len(idx)))
            lr = optimizer.config.lr_at(step)  # a server's at version `step`: one update a step
            for name, grad in grads.items():
                optimizer.step(name, params[name], grad, lr=lr)
            losses.append(loss)
            samples += len(idx)
            step += 1
            if on_step is not None:
                on_step(step, total, loss)
        epoch_losses.append(float(np.mean(losses)))
    wall = time.perf_counter() - start
    evaluating = sum(point["eval_s"] for point in curve)

    test_loss, test_acc = model.evaluate(params, data.X_test, data.y_test)
    return TrainResult(
        test_accuracy=test_acc,
        test_loss=test_loss,
        final_train_loss=epoch_losses[-1],
        steps=step,
        wall_s=wall,
        train_s=wall - evaluating,
        samples_per_s=samples / max(wall - evaluating, 1e-9),  # training's own speed
        params=params,
        epoch_losses=epoch_losses,
        test_curve=curve,
        eval_s=evaluating,
    )
