"""One worker process from start to end: its data shard, the model, the client, the loop.

`tinyps worker` and the launcher's worker processes call `run_worker_process`. It writes one
JSON line per step to a metrics file (flushed, so a launcher can follow the run live) and
returns what the worker saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ps.client import PSClient
from ps.memory import keep_freed_buffers
from ps.security import TLSFiles
from worker.data import load_dataset
from worker.loop import StepRecord, WorkerConfig, run_worker
from worker.model import MLP
from worker.partition import PARTITION_SCHEMES, partition
from worker.precision import GROWTH_INTERVAL, INIT_SCALE, Precision
from worker.privacy import DPConfig

__all__ = ["WorkerSettings", "run_worker_process", "steps_for"]


@dataclass(frozen=True)
class WorkerSettings:
    servers: tuple[str, ...]  # server addresses, in server-index order
    index: int  # this worker's id, 0 .. workers-1
    workers: int  # how many workers share the data
    dataset: str = "digits"
    hidden: tuple[int, ...] = (128,)
    steps: int | None = None  # steps for this worker; None: epochs over its shard
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    placement: str = "size_balanced"
    split_bytes: int | None = None  # split tensors larger than this across servers
    partition: str = "iid"
    alpha: float = 0.5  # label_skew's Dirichlet concentration
    slowdown: float = 1.0  # an injected straggler: compute takes this many times as long
    seed: int = 0
    fused: bool = True  # PushPull round trips
    shared_memory: bool = True  # tensors through mailboxes to servers on this host
    precision: str = "fp32"  # fp32 | fp16 | bf16: compute and traffic
    loss_scale: float | str = "auto"  # auto | dynamic | off | a static scale
    init_scale: float = INIT_SCALE  # dynamic scaling: the first scale ...
    growth_interval: int = GROWTH_INTERVAL  # ... and the good steps that double it
    poison: str | None = None  # injected fault: label_flip | random_labels | scaled_gradient:F
    dp: DPConfig | None = None  # DP-SGD settings
    metrics: Path | None = None  # append one JSON line per step here
    start_time: float | None = None  # time.time() when the run started (metrics count from it)
    token: str | None = None  # the cluster's shared token, if it has one
    tls: TLSFiles | None = None  # client TLS files, if the servers speak TLS
    deadline_s: float = 30.0
    wait_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("a worker needs at least one server address")
        if not 0 <= self.index < self.workers:
            raise ValueError(f"worker index {self.index} is not in 0..{self.workers - 1}")
        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(f"partition must be one of {', '.join(PARTITION_SCHEMES)}, "
                             f"got {self.partition!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")


def steps_for(n_train: int, workers: int, batch_size: int, epochs: int) -> int:
    """Steps per worker for `epochs` passes over the training set, shared by W workers.

    Every worker makes the same number of steps, whatever its shard's size (label-skewed
    shards differ): a sync barrier needs all W pushes of every step. A worker whose shard is
    smaller simply starts its next pass sooner.
    """
    return max(1, epochs * (n_train // (workers * batch_size)))


def run_worker_process(settings: WorkerSettings) -> list[StepRecord]:
    """Train as worker `settings.index` until its steps are done; return its step records."""
    keep_freed_buffers()
    data = load_dataset(settings.dataset, seed=settings.seed)
    shard = partition(data, settings.workers, settings.partition, alpha=settings.alpha,
                      seed=settings.seed)[settings.index]
    model = MLP((data.n_features, *settings.hidden, data.n_classes), seed=settings.seed)
    steps = settings.steps or steps_for(len(data.X_train), settings.workers,
                                        settings.batch_size, settings.epochs)
    config = WorkerConfig(steps=steps, batch_size=settings.batch_size, seed=settings.seed,
                          slowdown=settings.slowdown, fused=settings.fused,
                          precision=settings.precision, loss_scale=settings.loss_scale,
                          init_scale=settings.init_scale,
                          growth_interval=settings.growth_interval,
                          poison=settings.poison, dp=settings.dp)
    # The run's clock is wall time (shared by every process of the run); the loop measures
    # with the monotonic clock, so translate the run's start into it.
    start = settings.start_time if settings.start_time is not None else time.time()
    origin = time.monotonic() - (time.time() - start)

    out = settings.metrics.open("a", encoding="utf-8") if settings.metrics else None
    try:
        def record(step: StepRecord) -> None:
            if out is not None:
                out.write(json.dumps(step.as_dict()) + "\n")
                out.flush()

        with PSClient(list(settings.servers), worker_id=settings.index, token=settings.token,
                      tls=settings.tls, deadline_s=settings.deadline_s, wait_s=settings.wait_s,
                      wire_dtype=Precision(settings.precision).wire_dtype,
                      shared_memory=settings.shared_memory) as client:
            optimizer = {"sgd": {}, "momentum": {"momentum": settings.momentum},
                         "adam": {}}.get(settings.optimizer, {})
            client.init(model.init_params(), settings.optimizer, placement=settings.placement,
                        split_bytes=settings.split_bytes, lr=settings.lr, **optimizer)
            # 0 in a new run; a restarted worker, or a resumed run, goes on from the servers.
            first = client.start_step()
            return run_worker(client, model, shard, config, image_shape=None, on_step=record,
                              origin=origin, first_step=first)
    finally:
        if out is not None:
            out.close()
