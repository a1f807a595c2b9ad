"""The loop a worker process runs: pull, compute gradients on its shard, push; and what it saw.

The consistency mode lives on the servers: the worker always asks for the step it is about to
compute, and the servers decide whether to answer at once (async), after a barrier (sync) or
within the staleness bound (ssp). By default a step's push and the next step's pull travel as
one PushPull round trip; `fused=False` makes them two calls, as a textbook draws them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from kernels import all_finite
from ps.client import PSClient
from worker.evaluate import HeldOut
from worker.poison import parse_poison, poison_grads, poison_shard
from worker.precision import Precision, PrecisionConfig
from worker.preprocess import augment_shifts
from worker.privacy import DPConfig, add_noise, poisson_batches
from worker.sequential import Sequential
from worker.shards import Shard

__all__ = ["StepRecord", "WorkerConfig", "batches", "run_worker"]


@dataclass(frozen=True)
class WorkerConfig:
    steps: int  # steps (pushes) this worker makes
    batch_size: int = 32  # examples per step
    seed: int = 0  # with the worker id, fixes the batch order
    shuffle: bool = True  # False: walk the shard in order (exact-equivalence tests)
    augment: bool = False  # one-pixel shifts of image batches
    slowdown: float = 1.0  # an injected straggler: compute takes this many times as long
    delay_s: float = 0.0  # an injected straggler: extra seconds per step
    fused: bool = True  # push and pull the next step's weights in one round trip (PushPull)
    # The number format and loss scaling (the client must travel in the same format).
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    poison: str | None = None  # injected fault (worker/poison.py): label_flip, ...
    dp: DPConfig | None = None  # DP-SGD: Poisson batches, per-example clipping, noise
    # The loss's divisor instead of the batch size (TrainConfig.loss_mean_over); None: B.
    loss_mean_over: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got steps={self.steps}, "
                             f"batch_size={self.batch_size}")
        if self.slowdown < 1.0 or self.delay_s < 0.0:
            raise ValueError(f"slowdown must be >= 1 and delay_s >= 0, got {self.slowdown}, "
                             f"{self.delay_s}")
        if self.poison is not None:
            parse_poison(self.poison)
        if self.loss_mean_over is not None and self.loss_mean_over < 1:
            raise ValueError(f"loss_mean_over must be >= 1, got {self.loss_mean_over}")
        if self.dp is not None and self.loss_mean_over is not None:
            raise ValueError("DP-SGD divides its noisy sum by the batch size: "
                             "loss_mean_over does not apply")
        if self.dp is not None and self.precision.precision != "fp32":
            raise ValueError("DP-SGD runs in fp32: per-example clipping is not emulated in "
                             f"{self.precision.precision}")


@dataclass(frozen=True)
class StepRecord:
    """One worker step, as metrics.jsonl records it. The eval fields are on the lines of the
    steps that were evaluated (worker 0's, see worker/evaluate.py) and left out of the others."""

    time: float  # seconds since the origin (the run's start), at the end of the step
    worker: int
    step: int
    loss: float
    staleness: int  # the stalest of this step's gradients when the servers applied them
    samples: int
    wait_s: float  # time spent in pull and push: blocked_s + wire_s
    blocked_s: float  # the part of wait_s the servers held this step's pull at a barrier or
    # the staleness bound (they measure it; the start line counts, at step 0)
    wire_s: float  # the rest of wait_s: encoding, transport, the servers' work
    pull_s: float  # the part of wait_s spent pulling this step's weights (0 when fused)
    push_s: float  # the part spent pushing (with fused PushPull: the whole round trip)
    compute_s: float  # forward and backward (and any injected slowdown)
    pulled: float  # seconds since the origin when the pull returned (the step began)
    pushing: float  # seconds since the origin when the push began
    loss_scale: float  # the loss scale this step used (1 without scaling)
    skipped: bool  # the step's gradients held inf/NaN (sync: any worker's) and were not applied
    grad_nonzero: int  # mixed precision: fp32 gradient values that were not 0 ...
    grad_underflow: int  # ... and those of them that became 0 in 16 bits
    test_accuracy: float | None = None  # held-out, at the weights pulled for this step
    test_loss: float | None = None
    eval_s: float | None = None  # seconds the evaluation took: not compute, not waiting

    def as_dict(self) -> dict:
        row = asdict(self)
        if self.test_accuracy is None:  # not measured on this step: left out of the line
            for name in ("test_accuracy", "test_loss", "eval_s"):
                del row[name]
        return row


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Endless index batches over range(n): epoch after epoch, reshuffled by rng if given.

    Every batch is full (an epoch's last partial batch is left out), so that W workers of
    batch b see exactly what one process of batch W*b sees; a shard smaller than one batch
    gives the whole shard each step.
    """
    if n < 1:
        raise ValueError("cannot draw batches from an empty shard")
    size = min(batch_size, n)
    while True:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for first in range(0, n - size + 1, size):
            yield order[first : first + size]


def run_worker(
    client: PSClient,
    model: Sequential,
    shard: Shard,
    config: WorkerConfig,
    image_shape: tuple[int, int] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    origin: float | None = None,
    first_step: int = 0,
    held_out: HeldOut | None = None,
) -> list[StepRecord]:
    """Run steps first_step .. config.steps-1 against the servers behind `client`; return
    what each saw.

    `origin` is a time.monotonic() reading that the record times count from (default: now);
    processes given the same origin have comparable times, as the clock is system-wide.
    `first_step` > 0 continues a run (a restarted worker, a resumed run): the batches are
    the ones that run would have drawn from there. `held_out`: evaluate the weights pulled
    for the steps it says are due, outside the step's compute and wait times.
    """
    precision = Precision(config.precision.precision)
    if client.wire_dtype != precision.wire_dtype:
        raise ValueError(f"the client travels in {client.wire_dtype}, but precision "
                         f"{precision.name} needs {precision.wire_dtype}")
    scaler, dynamic = config.precision.scaler()
    if config.poison is not None:
        shard = poison_shard(shard, config.poison, model.n_classes, config.seed)
    rng = np.random.default_rng((config.seed, client.worker_id))
    dp = config.dp
    if dp is not None:
        model.check_dp()  # a layer DP-SGD cannot clip is refused before any step
    if dp is None:
        order = batches(len(shard), config.batch_size, rng if config.shuffle else None)
    else:
        # Expected batch = batch_size, so the noisy sum is divided by it (as Opacus does).
        order = poisson_batches(len(shard), min(1.0, config.batch_size / len(shard)), rng)
        noise_rng = np.random.default_rng(
            None if dp.seed is None else (dp.seed, client.worker_id, 1))
    for _ in range(min(first_step, config.steps)):
        next(order)
    records: list[StepRecord] = []
    start = time.monotonic() if origin is None else origin
    todo = first_step < config.steps
    if todo:
        # One untimed pass loads the compiled kernels, so that step 0's compute time (and a
        # straggler's slowdown of it) is the model's, not the loading of machine code. Before
        # the pull of the first step: that pull is the start line, and loading takes each
        # process its own time, which would let the workers leave the line apart.
        # The pass calls what a step calls, the finiteness check included: a kernel that
        # step 0 loads would cost it milliseconds, and a straggler multiplies its compute.
        warm = model.init_params()
        _, warm_grads = model.loss_and_grads(warm, shard.X[:1], shard.y[:1], precision,
                                             scaler.get_scale(), {})
        if dp is not None:
            model.clipped_grad_sum(warm, shard.X[:1], shard.y[:1], dp.clip)
        all(all_finite(g) for g in warm_grads.values())
    t0 = time.monotonic()
    params = client.pull(first_step) if todo else {}
    pull_s = time.monotonic() - t0
    pull_blocked = client.last_blocked_s  # carried, with pull_s, into the step's record
    for step in range(first_step, config.steps):
        t0 = time.monotonic()  # the step's weights are here
        measured = None
        if held_out is not None and held_out.due(step, config.steps):
            measured = held_out.measure(model, params)
        t1 = time.monotonic()
        idx = next(order)
        X = shard.X[idx]
        if config.augment and image_shape is not None:
            X = augment_shifts(X, image_shape, rng)
        scale = scaler.get_scale()
        counts: dict[str, int] = {}
        if dp is None:
            # loss_mean_over: the gradient of sum(loss) / N, times the loss scale; the scale
            # alone travels with the push, so the servers divide out only the scale.
            factor = 1.0 if config.loss_mean_over is None else len(idx) / config.loss_mean_over
            loss, grads = model.loss_and_grads(params, X, shard.y[idx], precision,
                                               scale * factor, counts)
        else:
            loss, grads, _ = model.clipped_grad_sum(params, X, shard.y[idx], dp.clip)
            if dp.noise_at == "worker":
                add_noise(grads, dp.noise * dp.clip, noise_rng)
            for g in grads.values():
                g /= np.float32(config.batch_size)
        found_inf = not all(all_finite(g) for g in grads.values())
        if config.poison is not None:
            grads = poison_grads(grads, config.poison)
        t2 = time.monotonic()
        extra = (config.slowdown - 1.0) * (t2 - t1) + config.delay_s
        if extra > 0:
            time.sleep(extra)  # the injected straggler: simulated compute, not synchronisation
        t3 = time.monotonic()
        last = step == config.steps - 1
        # A step with inf/NaN gradients is pushed as skipped: it counts, nothing is applied.
        outgoing = None if found_inf else grads
        blocked = pull_blocked
        if config.fused and not last:
            result = client.push_pull(outgoing, step, scale=scale, skip=found_inf)
            params, staleness = result.params, result.staleness_max
            skipped = result.step_skipped  # sync: any worker's overflow skips the step for all
            blocked += result.blocked_s  # the pull half waited for the next step
            next_blocked = 0.0  # the next step's weights are here: no pull of its own
            t4 = t5 = time.monotonic()
        else:
            staleness = client.push(outgoing, step, scale=scale, skip=found_inf).staleness_max
            skipped = found_inf  # two calls: the push does not hear of other workers' skips
            t4 = time.monotonic()
            next_blocked = 0.0
            if not last:
                params = client.pull(step + 1)
                next_blocked = client.last_blocked_s
            t5 = time.monotonic()
        if dynamic:
            scaler.update(skipped)
        wait = pull_s + (t4 - t3)
        # The servers measured the hold inside the round trip; bounded by it all the same.
        blocked = min(blocked, wait)
        record = StepRecord(
            time=t4 - start, worker=client.worker_id, step=step, loss=loss,
            staleness=staleness, samples=len(idx),
            wait_s=wait, blocked_s=blocked, wire_s=wait - blocked,
            pull_s=pull_s, push_s=t4 - t3, compute_s=t3 - t1,
            pulled=t0 - start, pushing=t3 - start, loss_scale=scale, skipped=skipped,
            grad_nonzero=counts.get("nonzero", 0), grad_underflow=counts.get("underflow", 0),
            **(measured.as_dict() if measured is not None else {}),
        )
        pull_s, pull_blocked = t5 - t4, next_blocked  # the next step's pull: its wait
        records.append(record)
        if on_step is not None:
            on_step(record)
    return records
