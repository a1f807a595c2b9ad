"""One supervisor for every backend: it follows a run to its end and decides what faults mean.

Written once, as torchrun's elastic agent is: it follows the workers' progress, injects the
faults the config asks for, restarts a dead server or a killed worker while restarts remain,
ends a worker that hangs after the others are done, and at the end takes the model and the
counters from the servers (`finish`). A backend (local processes, Ray actors) knows only how
its processes start, report and stop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from ps.checkpoint_set import RoundRecorder
from ps.client import PSClient
from ps.placement import Placement
from tinyps import privacy
from tinyps.config import LaunchConfig
from tinyps.plan import LaunchError, LaunchPlan
from tinyps.summary import build_summary
from worker.data import Dataset
from worker.model import MLP

__all__ = ["Backend", "Progress", "Supervisor", "WorkerNews", "summarise"]

# Progress(steps done, steps in all, latest loss per worker, samples per second)
Progress = Callable[[int, int, dict[int, float], float], None]


@dataclass(frozen=True)
class WorkerNews:
    """A worker that is no longer running as it was: finished, died, or failed."""

    index: int
    finished: bool = False
    died: str | None = None  # killed (by a signal, or its actor is gone): how
    failed: str | None = None  # ended with an error: its exit code and the end of its log


class Backend(ABC):
    """How the processes of a run start, report and stop: the supervisor decides the rest."""

    poll_s: float = 0.05  # how often the supervisor asks (a monitoring interval)

    @abstractmethod
    def start_servers(self, restore: bool) -> list[str]:
        """Start every server, wait until each is healthy; their addresses."""

    @abstractmethod
    def start_worker(self, index: int) -> None:
        """Start (or start again) worker `index`."""

    @abstractmethod
    def poll(self, running: set[int]) -> tuple[list[dict], list[WorkerNews]]:
        """The step records that arrived since the last poll, and what changed among the
        `running` workers (news of a worker comes after all of its records)."""

    def dead_servers(self) -> list[int]:
        """Servers that died and wait for the supervisor to restart them."""
        return []

    def restart_server(self, index: int) -> str:
        """Start dead server `index` again, on its address, from its newest checkpoint;
        what happened, for the run's fault events."""
        raise NotImplementedError

    def server_death(self, index: int) -> str:
        """How server `index` died, for an error message."""
        return ""

    @abstractmethod
    def server_restarts(self) -> int:
        """Restarts of servers so far (by the supervisor or by the backend itself)."""

    @abstractmethod
    def kill(self, kind: str, index: int, done: int) -> str | None:
        """An injected fault: kill server or worker `index` as a crash would; the event."""

    @abstractmethod
    def end_worker(self, index: int) -> None:
        """End a hung worker for good."""

    @abstractmethod
    def wait_servers_stopped(self, timeout: float) -> None:
        """After Shutdown: until every server has stopped (its final checkpoint written)."""

    @abstractmethod
    def checkpoints_written(self) -> int:
        """Checkpoints the servers wrote in all, restarts and final ones included."""

    def final_events(self) -> list[str]:
        """Fault events the backend learns of only at the end (restarts it made itself)."""
        return []

    @abstractmethod
    def close(self) -> None:
        """End every process of the run, whatever state it is in."""


@dataclass
class Supervisor:
    """Follows one run on one backend; `run` returns its step records, `finish` its result."""

    plan: LaunchPlan
    backend: Backend
    addresses: list[str] = field(default_factory=list)
    worker_restarts: int = 0
    lost_workers: list[int] = field(default_factory=list)  # died or hung, not restarted
    events: list[str] = field(default_factory=list)  # faults seen and what was done
    rounds: RoundRecorder | None = None  # the run's checkpoint manifest (_record_checkpoints)

    @property
    def config(self) -> LaunchConfig:
        return self.plan.config

    def restarts(self) -> int:
        return self.worker_restarts + self.backend.server_restarts()

    def start(self) -> None:
        self.addresses = self.backend.start_servers(restore=self.config.resume is not None)
        for i in range(self.config.workers):
            self.backend.start_worker(i)

    def run(self, progress: Progress | None = None) -> list[dict]:
        """Watch the run until every worker has finished or is lost; restart what dies."""
        config, faults = self.config, self.config.faults
        records: list[dict] = []
        total = self.plan.steps * config.workers
        latest: dict[int, float] = {}  # worker -> its latest loss
        seen: dict[int, float] = {}  # worker -> when its latest record arrived
        first, last, samples = float("inf"), 0.0, 0
        pending = [(kind, k) for kind, k in (("server", faults.kill_server),
                                             ("worker", faults.kill_worker)) if k is not None]
        running = set(range(config.workers))
        while running:
            new, news = self.backend.poll(running)
            for r in new:
                latest[r["worker"]] = r["loss"]
                seen[r["worker"]] = time.monotonic()
                first, last = min(first, r["pulled"]), max(last, r["time"])
                samples += r["samples"]
            records += new
            for n in news:
                if n.failed is not None:
                    raise LaunchError(f"worker{n.index} failed {n.failed}")
                if n.finished or not self._worker_died(n.index, n.died):
                    running.discard(n.index)
            if progress is not None and latest:
                rate = samples / (last - first) if last > first else 0.0
                progress(len(records), total, latest, rate)
            for kind, (index, after) in list(pending):
                if len(records) >= after:
                    if (event := self.backend.kill(kind, index, len(records))) is not None:
                        self.events.append(event)
                    pending.remove((kind, (index, after)))
            for index in self.backend.dead_servers():
                self._restart_server(index)
            self._end_hung(running, seen)
            self._record_checkpoints()
            if running:
                time.sleep(self.backend.poll_s)  # a monitoring interval, not synchronisation
        return records

    def _restart_server(self, index: int) -> None:
        max_restarts = self.config.faults.max_restarts
        if self.restarts() >= max_restarts:
            raise LaunchError(f"server{index} {self.backend.server_death(index)} and the "
                              f"{max_restarts} restarts are used up")
        self.events.append(self.backend.restart_server(index))

    def _worker_died(self, index: int, how: str) -> bool:
        """Tell the servers, so that no barrier waits for it; restart it if we may. Returns
        whether it runs again."""
        with PSClient(self.addresses, token=self.config.security.token,
                      tls=self.config.tls(client=True)) as client:
            client.leave(index)
        if self.restarts() < self.config.faults.max_restarts:
            self.worker_restarts += 1
            self.backend.start_worker(index)
            self.events.append(f"restarted worker{index} ({how}); it rejoins")
            return True
        self.lost_workers.append(index)
        self.events.append(f"worker{index} died ({how}): the run goes on without it")
        return False

    def _end_hung(self, running: set[int], seen: dict[int, float]) -> None:
        """Once the others are done, a worker silent for a whole lease is hung: end it."""
        if len(running) != 1 or self.config.workers == 1:
            return
        index = next(iter(running))
        quiet = time.monotonic() - seen.get(index, time.monotonic())
        if index in seen and quiet > self.config.store.lease_s:
            self.backend.end_worker(index)
            running.discard(index)
            self.lost_workers.append(index)
            self.events.append(f"worker{index} silent for {quiet:.0f} s after the others "
                               f"finished: ended as hung")

    def _record_checkpoints(self, final: bool = False) -> None:
        """Note in the run's manifest the rounds of checkpoints now on every server's disk (a
        resume takes the newest); final: after the servers stopped, their final ones. The
        recorder looks at the files at most once a second, and reports each problem once."""
        if self.rounds is None:
            self.rounds = RoundRecorder(self.plan.checkpoints, self.config.servers)
        self.events += self.rounds.record(final=final)

    def finish(self, records: list[dict]) -> tuple[dict, dict]:
        """The model and the counters from the servers, evaluated here; then stop the servers
        (each writes a final checkpoint): (summary, params)."""
        config, plan = self.config, self.plan
        with PSClient(self.addresses, token=config.security.token,
                      tls=config.tls(client=True)) as client:
            stats = client.stats()
            params = client.pull()
            client.shutdown()
        self.backend.wait_servers_stopped(config.startup_timeout_s)
        self._record_checkpoints(final=True)
        faults = {"restarts": self.restarts(),
                  "checkpoints_written": self.backend.checkpoints_written(),
                  "workers_lost": sorted(self.lost_workers),
                  "fault_events": self.events + self.backend.final_events()}
        summary = summarise(config, plan.data, plan.placement, records, stats, params,
                            time.time() - plan.started, plan.steps, faults)
        summary.update(privacy.spent(config, plan.shard_sizes,
                                     privacy.steps_made(records, config.workers,
                                                        resumed=plan.resumed is not None)))
        return summary, params


def summarise(config: LaunchConfig, data: Dataset, placement: Placement, records: list[dict],
              stats: list[dict], params: dict, wall_s: float, steps: int,
              faults: dict | None = None) -> dict:
    """summary.json of a run: the trained model evaluated on the test split, with the
    servers' counters and the workers' records."""
    model = MLP((data.n_features, *config.train.hidden, data.n_classes))
    test_loss, test_accuracy = model.evaluate(params, data.X_test, data.y_test)
    return build_summary(config, records, stats, test_loss, test_accuracy, placement, wall_s,
                         steps, len(data.X_train), faults)
