"""One supervisor for every backend: it follows a run to its end and decides what faults mean.

Written once, as torchrun's elastic agent is: it follows the workers' progress, injects the
faults the config asks for, restarts a dead server or a killed worker while restarts remain,
ends a worker that hangs after the others are done, and at the end takes the model and the
counters from the servers (`finish`). A backend (local processes, Ray actors) knows only how
its processes start, report and stop.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from ps.checkpoint_set import RoundRecorder
from ps.client import PSClient, PSError
from ps.placement import Placement
from ps.snapshot import Snapshot
from tinyps import privacy
from tinyps.config import LaunchConfig
from tinyps.health import HealthWatch
from tinyps.plan import LaunchError, LaunchPlan
from tinyps.rundir import unwritable
from tinyps.summary import build_summary
from worker.data import Dataset
from worker.model_spec import build_model

__all__ = ["Backend", "Progress", "Supervisor", "WorkerNews", "resumed_step", "summarise"]

# Progress(steps done, steps in all, latest loss per worker, samples per second, latest
# held-out test accuracy or None before the first)
_FAULT_POLL_S = 0.005  # steps take a few ms: at 50 ms, "kill after 200" fired after 230

Progress = Callable[[int, int, dict[int, float], float, float | None], None]
# What the supervisor does about a fault, told as it happens (the summary keeps them all).
Events = Callable[[str], None]

_SALVAGE_S = 5.0  # after Ctrl-C: how long the servers have to hand over what they hold


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

    # The backend restarts a killed server by itself (Ray does, up to max_restarts): the
    # supervisor then only ends a frozen one.
    restarts_servers_itself: bool = False

    @abstractmethod
    def end_frozen_server(self, index: int) -> None:
        """End server `index`, which no longer answers, as a crash would (SIGKILL); then it
        is a dead server (or, restarts_servers_itself, one the backend restarts)."""

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
    def wait_servers_stopped(self, timeout: float) -> list[int]:
        """After Shutdown: wait, at most `timeout` s, until every server has stopped (its
        final checkpoint written); the servers still running then (close() ends them)."""

    @abstractmethod
    def checkpoints_written(self) -> int:
        """Checkpoints the servers wrote in all, restarts and final ones included."""

    def final_events(self) -> list[str]:
        """Fault events the backend learns of only at the end (restarts it made itself)."""
        return []

    @abstractmethod
    def close(self, grace_s: float = 5.0) -> None:
        """End every process of the run, whatever state it is in: asked to stop, then
        killed after `grace_s` (0: killed at once)."""


def resumed_step(snapshots: list[Snapshot], mode: str) -> int:
    """The step a run resumed from these checkpoints starts its workers at, as the workers
    find it (PSClient.start_step): each server's start (every worker has pushed that many
    steps to each of its keys; in sync, the updates applied to every key count too), and the
    furthest of the servers, because a server behind skips ahead to it. (Over the resumed
    run's own layout; a re-split may start a step lower, never higher.)"""
    def start(snapshot: Snapshot) -> int:
        step = min((int(k.clocks.min()) for k in snapshot.keys if k.clocks.size), default=0)
        if mode == "sync":
            step = max(step, min((k.version for k in snapshot.keys), default=0))
        return step

    return max((start(s) for s in snapshots), default=0)


@dataclass
class Supervisor:
    """Follows one run on one backend; `run` follows it, `finish` (or `salvage`, after a
    Ctrl-C) gives its result."""

    plan: LaunchPlan
    backend: Backend
    on_event: Events | None = None  # told each fault event as it happens
    addresses: list[str] = field(default_factory=list)
    worker_restarts: int = 0
    lost_workers: list[int] = field(default_factory=list)  # died or hung, not restarted
    events: list[str] = field(default_factory=list)  # faults seen and what was done
    records: list[dict] = field(default_factory=list)  # the workers' steps, this launch
    rounds: RoundRecorder | None = None  # the run's checkpoint manifest (_record_checkpoints)
    _watch: HealthWatch | None = None

    @property
    def config(self) -> LaunchConfig:
        return self.plan.config

    @property
    def first_step(self) -> int:
        """The step this launch starts at: 0, or where the resumed run's checkpoints are."""
        resumed = self.plan.resumed
        return 0 if resumed is None else min(resumed_step(resumed, self.config.mode),
                                             self.plan.steps)

    def restarts(self) -> int:
        return self.worker_restarts + self.backend.server_restarts()

    def _event(self, text: str) -> None:
        self.events.append(text)
        if self.on_event is not None:
            self.on_event(text)

    def start(self) -> None:
        self.addresses = self.backend.start_servers(restore=self.config.resume is not None)
        for i in range(self.config.workers):
            self.backend.start_worker(i)

    def run(self, progress: Progress | None = None) -> list[dict]:
        """Watch the run until every worker has finished or is lost; restart what dies or
        freezes."""
        timeout = self.config.faults.freeze_timeout_s
        # A few checks in each freeze window, each with a deadline well inside it.
        self._watch = HealthWatch(self.addresses, self.config.security.token,
                                  self.config.tls(client=True), every_s=min(1.0, timeout / 4),
                                  deadline_s=min(1.0, timeout / 4)).start()
        try:
            return self._follow(progress)
        finally:
            self._watch.close()

    def _follow(self, progress: Progress | None) -> list[dict]:
        config, faults = self.config, self.config.faults
        records = self.records
        total = (self.plan.steps - self.first_step) * config.workers  # this launch's steps
        latest: dict[int, float] = {}  # worker -> its latest loss
        accuracy: float | None = None  # the latest held-out accuracy (worker 0 measures it)
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
                if r.get("test_accuracy") is not None:
                    accuracy = r["test_accuracy"]
            records += new
            for n in news:
                if n.failed is not None:
                    raise LaunchError(self._failure(f"worker{n.index} failed {n.failed}"))
                if n.finished or not self._worker_died(n.index, n.died):
                    running.discard(n.index)
            if progress is not None and latest:
                rate = samples / (last - first) if last > first else 0.0
                progress(min(len(records), total), total, latest, rate, accuracy)
            for kind, (index, after) in list(pending):
                if len(records) >= after:
                    if (event := self.backend.kill(kind, index, len(records))) is not None:
                        self._event(event)
                        if kind == "server" and self.backend.restarts_servers_itself:
                            # Its backend brings it back: a start-up's time before the
                            # health watch may call it frozen.
                            self._watch.reset(index, config.startup_timeout_s)
                    pending.remove((kind, (index, after)))
            for index in self.backend.dead_servers():
                self._restart_server(index)
            self._restart_frozen()
            for event in self._watch.take_events():
                self._event(event)
            self._end_hung(running, seen)
            self._record_checkpoints()
            if running:
                # A monitoring interval, not synchronisation; shorter while an injected fault
                # waits for its step, so that it fires within a few steps of the one asked.
                time.sleep(_FAULT_POLL_S if pending else self.backend.poll_s)
        return records

    def _failure(self, message: str) -> str:
        """A failed worker's message; first, whether it failed because the run directory,
        where it writes its steps, can no longer be written."""
        reason = unwritable(self.plan.run_dir)
        if reason is None:
            return message
        return (f"the run directory {self.plan.run_dir} cannot be written ({reason}): "
                f"free space there or choose another --run-dir; {message}")

    def _restart_server(self, index: int) -> None:
        max_restarts = self.config.faults.max_restarts
        if self.restarts() >= max_restarts:
            raise LaunchError(f"server{index} {self.backend.server_death(index)} and the "
                              f"{max_restarts} restarts are used up")
        self._event(self.backend.restart_server(index))
        if self._watch is not None:
            self._watch.reset(index)

    def _restart_frozen(self) -> None:
        """A server whose health check has not answered for freeze_timeout_s is frozen
        (stopped, deadlocked, swapped out): kill it and restart it like a dead one."""
        timeout = self.config.faults.freeze_timeout_s
        for index, quiet in enumerate(self._watch.silent_for()):
            if quiet < timeout:
                continue
            max_restarts = self.config.faults.max_restarts
            if not self.backend.restarts_servers_itself and self.restarts() >= max_restarts:
                raise LaunchError(f"server{index} did not answer its health check for "
                                  f"{quiet:.0f} s (frozen) and the {max_restarts} restarts "
                                  f"are used up")
            self.backend.end_frozen_server(index)
            if index in self.backend.dead_servers():
                self.backend.restart_server(index)  # back and healthy when it returns
            # A backend that restarts it by itself has a start-up's time to bring it back.
            self._watch.reset(index, self.config.startup_timeout_s
                              if self.backend.restarts_servers_itself else 0.0)
            self._event(f"server{index} did not answer its health check for {quiet:.0f} s: "
                        f"frozen; killed and restarted from its checkpoint")

    def _worker_died(self, index: int, how: str) -> bool:
        """Tell the servers, so that no barrier waits for it; restart it if we may. Returns
        whether it runs again."""
        with PSClient(self.addresses, token=self.config.security.token,
                      tls=self.config.tls(client=True)) as client:
            client.leave(index)
        if self.restarts() < self.config.faults.max_restarts:
            self.worker_restarts += 1
            self.backend.start_worker(index)
            self._event(f"restarted worker{index} ({how}); it rejoins")
            return True
        self.lost_workers.append(index)
        self._event(f"worker{index} died ({how}): the run goes on without it")
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
            self._event(f"worker{index} silent for {quiet:.0f} s after the others "
                        f"finished: ended as hung")

    def _record_checkpoints(self, final: bool = False) -> None:
        """Note in the run's manifest the rounds of checkpoints now on every server's disk (a
        resume takes the newest); final: after the servers stopped, their final ones. The
        recorder looks at the files at most once a second, and reports each problem once."""
        if self.rounds is None:
            self.rounds = RoundRecorder(self.plan.checkpoints, self.config.servers)
        for event in self.rounds.record(final=final):
            self._event(event)

    def _stop_servers(self, client: PSClient, timeout: float) -> None:
        """Shutdown, and wait for the servers' final checkpoints; a server that does not
        stop in time is a fault event (close() ends it), not a failed run."""
        client.shutdown()
        for index in self.backend.wait_servers_stopped(timeout):
            self._event(f"server{index} did not stop within {timeout:.0f} s of the Shutdown "
                        f"call: ended (its final checkpoint may be missing)")
        self._record_checkpoints(final=True)

    def finish(self, records: list[dict] | None = None) -> tuple[dict, dict]:
        """The model and the counters from the servers, evaluated here; then stop the servers
        (each writes a final checkpoint): (summary, params)."""
        config = self.config
        if records is not None:
            self.records = records
        with PSClient(self.addresses, token=config.security.token,
                      tls=config.tls(client=True)) as client:
            stats = client.stats()
            params = client.pull()
            if self._watch is not None:  # a checkpoint that failed since the watch's last look
                for i, s in enumerate(stats):
                    self._watch.check_stats(i, s)
                for event in self._watch.take_events():
                    self._event(event)
            self._stop_servers(client, config.startup_timeout_s)
        return self._summary(stats, params), params

    def salvage(self) -> tuple[dict, dict | None]:
        """After Ctrl-C: what the run has. The servers' current weights and counters if they
        answer within a few seconds (then they stop, each writing a final checkpoint, which
        a resume starts from); the steps recorded so far in any case. A second Ctrl-C cuts
        it short. (summary marked interrupted, params or None)."""
        config, stats, params, notes = self.config, [], None, []
        try:
            if self.addresses:
                with PSClient(self.addresses, token=config.security.token,
                              tls=config.tls(client=True), deadline_s=_SALVAGE_S,
                              retry_s=_SALVAGE_S) as client:
                    try:
                        stats = client.stats()
                        params = client.pull()
                        self._stop_servers(client, _SALVAGE_S)
                    except (PSError, OSError) as err:
                        notes.append(f"the servers did not answer within {_SALVAGE_S:.0f} s "
                                     f"({str(err).splitlines()[0]})")
        except KeyboardInterrupt:
            notes.append("interrupted again while the servers were asked for the model")
        # The steps the workers recorded since the loop last looked: the summary counts what
        # is on disk, not what the 50 ms loop happened to have read when Ctrl-C came.
        with contextlib.suppress(KeyboardInterrupt):
            self.records += self.backend.poll(set())[0]
        if params is None:
            notes.append("model.npz not written: the model was not pulled from the servers")
        summary = self._summary(stats if params is not None else [], params)
        summary.update(interrupted=True, interrupt_notes=notes)
        return summary, params

    def _summary(self, stats: list[dict], params: dict | None) -> dict:
        config, plan, records = self.config, self.plan, self.records
        faults = {"restarts": self.restarts() if stats else self.worker_restarts,
                  "checkpoints_written": self.backend.checkpoints_written(),
                  "workers_lost": sorted(self.lost_workers),
                  "fault_events": self.events + (self.backend.final_events() if stats else [])}
        summary = summarise(config, plan.data, plan.placement, records, stats, params,
                            time.time() - plan.started, plan.steps, faults)
        summary.update(privacy.spent(config, plan.shard_sizes,
                                     privacy.steps_made(records, config.workers,
                                                        resumed=plan.resumed is not None)))
        first = self.first_step
        summary.update(
            interrupted=False,
            # This launch's part of the run: a resumed run starts where its checkpoints are.
            steps_this_launch=plan.steps - first,
            steps_done=len(records),  # step records received, all workers together
            resumed_from=(None if plan.resumed is None else
                          {"run": str(config.resume), "step": first}),
            resume_notes=list(getattr(plan, "resume_notes", [])))
        return summary


def summarise(config: LaunchConfig, data: Dataset, placement: Placement, records: list[dict],
              stats: list[dict], params: dict | None, wall_s: float, steps: int,
              faults: dict | None = None) -> dict:
    """summary.json of a run: the trained model evaluated on the test split (None: no model,
    no test figures), with the servers' counters and the workers' records."""
    test_loss = test_accuracy = None
    if params is not None:
        model = build_model(config.train, data.n_features, data.image_shape, data.n_classes)
        test_loss, test_accuracy = model.evaluate(params, data.X_test, data.y_test)
    return build_summary(config, records, stats, test_loss, test_accuracy, placement, wall_s,
                         steps, len(data.X_train), faults)
