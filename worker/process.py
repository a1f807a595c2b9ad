"""One worker process from start to end: its data shard, the model, the client, the loop.

`tinyps worker` and the launcher's worker processes call `run_worker_process`. It writes one
JSON line per step to a metrics file (flushed, so a launcher can follow the run live) and
returns what the worker saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ps.client import PSClient
from ps.placement import PlacementConfig
from ps.security import SecurityConfig
from ps.settings import part, setting
from worker.data import load_dataset
from worker.evaluate import HeldOut, eval_interval
from worker.loop import StepRecord, WorkerConfig, run_worker
from worker.model_spec import build_model
from worker.poison import parse_poison
from worker.precision import Precision, PrecisionConfig
from worker.privacy import PrivacyConfig
from worker.settings import SplitConfig, TrainConfig
from worker.shards import partition

__all__ = ["TransportConfig", "WorkerSettings", "parse_addresses", "run_worker_process",
           "steps_for"]


def parse_addresses(text: str) -> tuple[str, ...]:
    """"HOST:PORT,HOST:PORT" -> the addresses, each checked."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        host, sep, port = p.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {p!r}")
    if not parts:
        raise ValueError("expected at least one HOST:PORT")
    return parts


@dataclass(frozen=True)
class TransportConfig:
    """How a worker's tensors travel to its servers."""

    fused: bool = setting(True, "push a step and pull the next in one PushPull round trip")
    shared_memory: bool = setting(
        True, "tensors through a shared-memory mailbox and a local socket to a server on this "
              "host (else every call through gRPC, tensors in the messages)")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything one worker process is told: `run_worker_process(settings)` runs it."""

    servers: tuple[str, ...] = setting(
        (), "server addresses, comma separated, in server order", parse=parse_addresses)
    index: int = setting(0, "this worker's id, 0 .. workers-1")
    workers: int = setting(1, "how many workers share the data")
    train: TrainConfig = part(TrainConfig)
    split: SplitConfig = part(SplitConfig)
    placement: PlacementConfig = part(PlacementConfig)
    precision: PrecisionConfig = part(PrecisionConfig)
    privacy: PrivacyConfig = part(PrivacyConfig)
    security: SecurityConfig = part(SecurityConfig)
    transport: TransportConfig = part(TransportConfig)
    slowdown: float = setting(1.0, "compute this many times slower (an injected straggler)")
    poison: str | None = setting(
        None, "injected fault: label_flip | random_labels | scaled_gradient:F")
    metrics: str | None = setting(None, "append one JSON line per step here")
    start_time: float | None = setting(
        None, "the run's start (Unix time); metrics count from it")
    deadline_s: float = setting(30.0, "no call to a server waits longer than this")
    wait_s: float = setting(300.0, "no barrier wait lasts longer than this")

    def __post_init__(self) -> None:
        object.__setattr__(self, "servers", tuple(self.servers))
        if self.metrics is not None:
            object.__setattr__(self, "metrics", str(self.metrics))
        if not self.servers:
            raise ValueError("a worker needs at least one server address (--servers)")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 <= self.index < self.workers:
            raise ValueError(f"worker index {self.index} is not in 0..{self.workers - 1}")
        if self.slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1, got {self.slowdown}")
        if self.poison is not None:
            parse_poison(self.poison)
        if self.privacy.on and self.precision.precision != "fp32":
            raise ValueError("DP-SGD runs in fp32: per-example clipping is not emulated in "
                             f"{self.precision.precision}")
        if not (self.deadline_s > 0 and self.wait_s > 0):
            raise ValueError(f"deadline_s and wait_s must be > 0, got {self.deadline_s}, "
                             f"{self.wait_s}")


def steps_for(n_train: int, workers: int, batch_size: int, epochs: int) -> int:
    """Steps per worker for `epochs` passes over the training set, shared by W workers.

    Every worker makes the same number of steps, whatever its shard's size (label-skewed
    shards differ): a sync barrier needs all W pushes of every step. A worker whose shard is
    smaller simply starts its next pass sooner.
    """
    return max(1, epochs * (n_train // (workers * batch_size)))


def run_worker_process(settings: WorkerSettings) -> list[StepRecord]:
    """Train as worker `settings.index` until its steps are done; return its step records."""
    train = settings.train
    data = load_dataset(train.dataset, seed=train.seed)
    shard = partition(data, settings.workers, settings.split.partition,
                      alpha=settings.split.alpha, seed=train.seed)[settings.index]
    model = build_model(train, data.n_features, data.image_shape, data.n_classes,
                        seed=train.seed)
    steps = train.steps or steps_for(len(data.X_train), settings.workers, train.batch_size,
                                     train.epochs)
    config = WorkerConfig(steps=steps, batch_size=train.batch_size, seed=train.seed,
                          augment=train.augment, slowdown=settings.slowdown,
                          fused=settings.transport.fused, precision=settings.precision,
                          poison=settings.poison, dp=settings.privacy.dp(),
                          loss_mean_over=train.loss_mean_over)
    # Worker 0 alone evaluates on the test set: the others would only repeat its figures.
    held_out = None
    if settings.index == 0:
        every = eval_interval(train.eval_every,
                              len(shard) // max(1, min(train.batch_size, len(shard))))
        if every and len(data.X_test):
            held_out = HeldOut(data.X_test, data.y_test, every)
    # The run's clock is wall time (shared by every process of the run); the loop measures
    # with the monotonic clock, so translate the run's start into it.
    start = settings.start_time if settings.start_time is not None else time.time()
    origin = time.monotonic() - (time.time() - start)

    out = open(settings.metrics, "a", encoding="utf-8") if settings.metrics else None  # noqa: SIM115
    try:
        def record(step: StepRecord) -> None:
            if out is not None:
                out.write(json.dumps(step.as_dict()) + "\n")
                out.flush()

        security = settings.security
        with PSClient(list(settings.servers), worker_id=settings.index, token=security.token,
                      tls=security.tls(client=True), deadline_s=settings.deadline_s,
                      wait_s=settings.wait_s,
                      wire_dtype=Precision(settings.precision.precision).wire_dtype,
                      shared_memory=settings.transport.shared_memory) as client:
            client.init(model.init_params(), train.optimizer,
                        placement=settings.placement.placement,
                        split_bytes=settings.placement.split_bytes,
                        **train.optimizer_settings(steps))
            # 0 in a new run; a restarted worker, or a resumed run, goes on from the servers.
            first = client.start_step()
            return run_worker(client, model, shard, config, image_shape=data.image_shape,
                              on_step=record, origin=origin, first_step=first,
                              held_out=held_out)
    finally:
        if out is not None:
            out.close()
