"""The Ray backend: the launcher's cluster with every server and worker a Ray actor.

Same job, same command lines, same run directory as tinyps.launcher.launch; Ray places the
actors on its nodes, restarts a dead server actor in place, and ends them all at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ps.checkpoint import list_checkpoints
from ps.client import PSClient, wait_healthy
from ps.memory import keep_freed_buffers
from ps.placement import Placement
from ps.server import RunningServer, serve
from tinyps import privacy
from tinyps.cli import build_parser, server_kwargs, worker_settings
from tinyps.config import LaunchConfig
from tinyps.launcher import (
    Follower,
    LaunchError,
    Progress,
    prepare_launch,
    server_args,
    worker_args,
    write_results,
)
from tinyps.processes import TOKEN_ENV
from tinyps.summary import build_summary
from worker.data import Dataset
from worker.model import MLP
from worker.process import WorkerSettings, run_worker_process

__all__ = ["kill_server_actor", "launch_ray"]

_POLL_S = 0.1  # how often the driver asks the worker actors for their new step records
_STATE_FILE = "ray-actor.json"  # in a server's checkpoint folder: its port and start count
_MIN_SHARE = 0.01  # CPUs per actor below which the cluster is too small to be worth it


# -- a parsed command line, as cli.py turns it into a server or a worker --------------------


def _where() -> dict:
    """The node and process an actor runs in, for the run's logs."""
    context = ray.get_runtime_context()
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(),
            "pid": os.getpid()}


# -- the actors -----------------------------------------------------------------------------


class _ServerActor:
    """`tinyps server ARGV` in a Ray actor. Ray re-runs __init__ with the same arguments
    when it restarts the actor: then it restores its newest checkpoint and binds the port of
    its first start, read from its checkpoint folder (the placement group keeps it on the
    same node, so the folder and the address are the same ones)."""

    def __init__(self, argv: list[str], run: str, bind_node_ip: bool) -> None:
        keep_freed_buffers()
        args = build_parser().parse_args(argv)
        folder: Path = args.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        state_file = folder / _STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("run") == run:
            # Ray restarts an actor by running __init__ again with the same arguments: this
            # run's state file is already there.
            state["starts"] += 1
            args.port, args.restore = state["port"], True
        else:
            state = {"run": run, "starts": 1}
            if not args.restore:
                # The driver cleared its own node's folder; this node's may hold an earlier
                # run's checkpoints, which a restart would take for this run's.
                for path in list_checkpoints(folder):
                    path.unlink()
        if bind_node_ip:
            # The address Ray itself reaches this node on, so the other nodes can too.
            args.host = ray.util.get_node_ip_address()
        self._running: RunningServer = serve(**server_kwargs(args))
        state["port"] = self._running.port
        tmp = state_file.with_suffix(".tmp")  # whole or not at all, should we die writing
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(state_file)
        self._starts = state["starts"]

    def address(self) -> str:
        return self._running.address

    def starts(self) -> int:
        """How many times this server has started: 1, plus one per restart by Ray."""
        return self._starts

    def wait_stopped(self, timeout: float) -> bool:
        """After the Shutdown call: wait until the final checkpoint is written."""
        return self._running.wait(timeout)

    def checkpoints_written(self) -> int:
        return self._running.checkpoints_written

    def where(self) -> dict:
        return {**_where(), "address": self._running.address, "starts": self._starts}


class _WorkerActor:
    """`tinyps worker ARGV` in a Ray actor: run_worker_process in a thread, its step records
    going to a file on this node that the driver reads through poll(). Created before the
    servers' addresses are known, so that its start-up overlaps theirs; start() runs it."""

    def __init__(self, metrics: Path) -> None:
        # A file, as the local backend's workers write: run_worker_process appends to it.
        self._metrics = metrics
        self._metrics.unlink(missing_ok=True)
        self._follower = Follower([self._metrics])
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, argv: list[str]) -> None:
        settings = replace(worker_settings(build_parser().parse_args(argv)),
                           metrics=self._metrics)
        self._thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self._thread.start()

    def _run(self, settings: WorkerSettings) -> None:
        try:
            run_worker_process(settings)
        except BaseException:  # reported to the driver, which fails the run with it
            self._error = traceback.format_exc()

    def poll(self) -> tuple[list[dict], bool, str | None]:
        """(new step records, finished, the error's traceback if it failed)."""
        finished = not self._thread.is_alive()  # read first: no record comes after it
        records = self._follower.poll()
        if finished:
            self.discard()
        return records, finished, self._error

    def discard(self) -> None:
        self._metrics.unlink(missing_ok=True)

    def where(self) -> dict:
        return _where()


# -- the run --------------------------------------------------------------------------------


def _cpu_share(actors: int) -> float:
    """Each actor's share of the CPUs free in the cluster now (fractional, 4 decimals)."""
    free = ray.available_resources().get("CPU", 0.0)
    share = math.floor(free / actors * 1e4) / 1e4  # Ray counts resources in 1e-4 units
    if share < _MIN_SHARE:
        raise LaunchError(f"the Ray cluster has {free:g} free CPUs: too few for {actors} "
                          f"actors")
    return share


def _one_local_node() -> bool:
    """Whether the cluster is this machine alone: then servers bind what the local backend
    binds (127.0.0.1 by default), unreachable from any other machine."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address()


@dataclass
class _RayRun:
    """The actors of one run, and the supervision that keeps it going."""

    config: LaunchConfig
    run_dir: Path
    checkpoints: Path
    steps: int
    started: float
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    group: PlacementGroup | None = None
    share: float = 0.0
    local: bool = True  # one node, this machine's: see _one_local_node
    servers: list[ActorHandle] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    workers: list[ActorHandle | None] = field(default_factory=list)
    worker_restarts: int = 0
    lost_workers: list[int] = field(default_factory=list)  # killed, not restarted
    events: list[str] = field(default_factory=list)  # faults seen and what was done

    def reserve(self) -> None:
        """One bundle per actor, spread over the nodes: the whole run fits before anything
        starts, and an actor restarted in its bundle comes back on the same node."""
        config = self.config
        n = config.servers + config.workers
        self.share = _cpu_share(n)
        self.group = placement_group([{"CPU": self.share}] * n, strategy="SPREAD")
        try:
            ray.get(self.group.ready(), timeout=config.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"Ray could not place {n} actors of {self.share:g} CPUs in "
                              f"{config.startup_timeout_s:.0f} s") from None

    def _options(self, name: str, bundle: int, **options) -> dict:
        env = {var: str(max(1, int(self.share))) for var in
               ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS")}
        if self.config.token:
            env[TOKEN_ENV] = self.config.token  # never on a command line, as locally
        return dict(name=f"tinyps-{self.tag}-{name}", num_cpus=self.share,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=bundle),
                    runtime_env={"env_vars": env}, **options)

    def start_actors(self, restore: bool) -> None:
        """Start the servers and wait until each is healthy; create the workers' actors."""
        config = self.config
        self.local = local = _one_local_node()
        for i in range(config.servers):
            argv = server_args(config, None, self.checkpoints, i, restore=restore)
            # Ray restarts each server actor itself, up to max_restarts times; calls to one
            # that is restarting wait for it rather than fail.
            options = self._options(f"server{i}", i, max_restarts=config.max_restarts,
                                    max_task_retries=-1)
            self.servers.append(ray.remote(_ServerActor).options(**options)
                                .remote(argv, self.tag, not local))
        # Workers' actors start now too: their imports overlap the servers' start-up.
        self.workers = [self.create_worker(i) for i in range(config.workers)]
        try:
            self.addresses = ray.get([s.address.remote() for s in self.servers],
                                     timeout=config.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"servers not ready after {config.startup_timeout_s:.0f} s") \
                from None
        except RayActorError as err:
            raise LaunchError(f"a server actor did not start: {err}") from None
        unhealthy = wait_healthy(self.addresses, config.startup_timeout_s,
                                 config.tls(client=True))
        if unhealthy:
            raise LaunchError(f"servers not serving: {', '.join(unhealthy)}")
        for i, address in enumerate(self.addresses):
            (self.run_dir / f"server{i}.address").write_text(address + "\n")
            self._log(f"server{i}", self.servers[i].where.remote())

    def metrics(self, index: int) -> Path:
        return self.run_dir / "metrics" / f"worker{index}.jsonl"

    def create_worker(self, index: int) -> ActorHandle:
        # The driver restarts workers itself (as the local backend does, after a Leave).
        options = self._options(f"worker{index}", self.config.servers + index, max_restarts=0)
        return ray.remote(_WorkerActor).options(**options).remote(self.scratch(index))

    def scratch(self, index: int) -> Path:
        """Where worker `index` writes its step records on its node, for poll() to read."""
        return Path(tempfile.gettempdir()) / f"tinyps-{self.tag}-worker{index}.jsonl"

    def _lost(self, index: int) -> None:
        """Worker `index` is dead for good: the scratch file it leaves is ours to remove
        when it ran here (on other nodes, it stays in their temporary folder)."""
        self.lost_workers.append(index)
        self.workers[index] = None
        if self.local:
            self.scratch(index).unlink(missing_ok=True)

    def start_worker(self, index: int) -> None:
        """Run worker `index`'s command line in its actor; wait until it has started."""
        argv = worker_args(self.config, index, self.addresses, self.steps,
                           start_time=self.started)
        worker = self.workers[index]
        try:
            ray.get(worker.start.remote(argv), timeout=self.config.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"worker{index} not started after "
                              f"{self.config.startup_timeout_s:.0f} s") from None
        except RayActorError as err:
            raise LaunchError(f"worker{index}'s actor did not start: {err}") from None
        self._log(f"worker{index}", worker.where.remote())

    def _log(self, name: str, where: ray.ObjectRef) -> None:
        """A line in logs/NAME.log: where the actor runs (its own output is in Ray's logs)."""
        try:
            line = json.dumps(ray.get(where, timeout=self.config.startup_timeout_s))
        except (GetTimeoutError, RayActorError) as err:
            line = f"not placed: {err}"
        with (self.run_dir / "logs" / f"{name}.log").open("a") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {name} actor {line}\n")

    def supervise(self, progress: Progress | None) -> list[dict]:
        """Follow the workers until every one has finished or is lost; inject the faults the
        config asks for, and restart a killed worker."""
        config = self.config
        records: list[dict] = []
        total = self.steps * config.workers
        latest: dict[int, float] = {}  # worker -> its latest loss
        seen: dict[int, float] = {}  # worker -> when its latest record arrived
        first, last, samples = float("inf"), 0.0, 0
        pending_kills = [k for k in (("server", config.kill_server),
                                     ("worker", config.kill_worker)) if k[1] is not None]
        running = set(range(config.workers))
        while running:
            polls = {i: self.workers[i].poll.remote() for i in running}
            for i, ref in polls.items():
                try:
                    new, finished, error = ray.get(ref, timeout=config.startup_timeout_s)
                except RayActorError as err:
                    if not self._worker_died(i, err):
                        running.discard(i)
                    continue
                except GetTimeoutError:
                    raise LaunchError(f"worker{i} did not answer for "
                                      f"{config.startup_timeout_s:.0f} s") from None
                if error is not None:
                    raise LaunchError(f"worker{i} failed{self._dead_servers()}; its "
                                      f"traceback ends:\n{error[-2000:]}")
                with self.metrics(i).open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
                for r in new:
                    latest[r["worker"]] = r["loss"]
                    seen[r["worker"]] = time.monotonic()
                    first, last = min(first, r["pulled"]), max(last, r["time"])
                    samples += r["samples"]
                records += new
                if finished:
                    running.discard(i)
            if progress is not None and latest:
                rate = samples / (last - first) if last > first else 0.0
                progress(len(records), total, latest, rate)
            for kind, (index, after) in list(pending_kills):
                if len(records) >= after:
                    self._inject_kill(kind, index, len(records))
                    pending_kills.remove((kind, (index, after)))
            self._end_hung(running, seen)
            if running:
                time.sleep(_POLL_S)  # a monitoring interval, not synchronisation
        return records

    def _inject_kill(self, kind: str, index: int, done: int) -> None:
        if kind == "server":
            kill_server_actor(self.servers[index])
            self.events.append(f"injected: ray.kill of server{index}'s actor after {done} steps; "
                               f"Ray restarts it")
        elif self.workers[index] is not None:
            ray.kill(self.workers[index], no_restart=True)
            self.events.append(f"injected: ray.kill of worker{index}'s actor after {done} steps")

    def _worker_died(self, index: int, err: RayActorError) -> bool:
        """Tell the servers, so that no barrier waits for it; restart it if we may. Returns
        whether it runs again."""
        if index in self.lost_workers:
            return False
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        with PSClient(self.addresses, token=self.config.token,
                      tls=self.config.tls(client=True)) as client:
            client.leave(index)
        if self.worker_restarts + self._server_restarts() < self.config.max_restarts:
            self.worker_restarts += 1
            self.workers[index] = self.create_worker(index)
            self.start_worker(index)
            self.events.append(f"restarted worker{index} ({cause}); it rejoins")
            return True
        self._lost(index)
        self.events.append(f"worker{index} died ({cause}): the run goes on without it")
        return False

    def _server_restarts(self) -> int:
        try:  # a server actor being restarted answers once it is back
            starts = ray.get([s.starts.remote() for s in self.servers],
                             timeout=self.config.startup_timeout_s)
        except (RayActorError, GetTimeoutError) as err:
            raise LaunchError(f"a server actor is gone: {err}") from None
        return sum(n - 1 for n in starts)

    def _dead_servers(self) -> str:
        """For an error message: the server actors Ray has given up on, if any."""
        dead = []
        for i, server in enumerate(self.servers):
            try:
                ray.get(server.starts.remote(), timeout=5.0)
            except (RayActorError, GetTimeoutError):
                dead.append(f"server{i}")
        return f" (server actors dead for good: {', '.join(dead)})" if dead else ""

    def _end_hung(self, running: set[int], seen: dict[int, float]) -> None:
        """Once the others are done, a worker silent for a whole lease is hung: end it."""
        if len(running) != 1 or self.config.workers == 1:
            return
        index = next(iter(running))
        quiet = time.monotonic() - seen.get(index, time.monotonic())
        if index in seen and quiet > self.config.lease_s:
            ray.kill(self.workers[index], no_restart=True)
            running.discard(index)
            self._lost(index)
            self.events.append(f"worker{index} silent for {quiet:.0f} s after the others "
                               f"finished: ended as hung")

    def finish(self, data: Dataset, placement: Placement, records: list[dict]
               ) -> tuple[dict, dict]:
        """Counters and the final model from the servers, evaluated here; then stop the
        servers (each writes a final checkpoint) and count restarts and checkpoints."""
        config = self.config
        with PSClient(self.addresses, token=config.token, tls=config.tls(client=True)) as c:
            stats = c.stats()
            params = c.pull()
            c.shutdown()
        timeout = config.startup_timeout_s
        if not all(ray.get([s.wait_stopped.remote(timeout) for s in self.servers])):
            raise LaunchError(f"servers did not stop within {timeout:.0f} s")
        written = ray.get([s.checkpoints_written.remote() for s in self.servers])
        starts = ray.get([s.starts.remote() for s in self.servers])
        for i, n in enumerate(starts):
            if n > 1:
                self.events.append(f"server{i} restarted {n - 1} time(s) by Ray on "
                                   f"{self.addresses[i]} from its checkpoint")
                self._log(f"server{i}", self.servers[i].where.remote())
        faults = {"restarts": sum(n - 1 for n in starts) + self.worker_restarts,
                  "checkpoints_written": sum(written),
                  "workers_lost": sorted(self.lost_workers), "fault_events": self.events}
        model = MLP((data.n_features, *config.hidden, data.n_classes))
        test_loss, test_accuracy = model.evaluate(params, data.X_test, data.y_test)
        summary = build_summary(config, records, stats, test_loss, test_accuracy, placement,
                                time.time() - self.started, self.steps, len(data.X_train),
                                faults)
        return summary, params

    def end(self, grace_s: float = 10.0) -> None:
        """Kill every actor and wait until Ray reports each dead; free the placement group."""
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            # Its metrics file lives outside the run directory: remove it now.
            with contextlib.suppress(RayActorError, GetTimeoutError):
                ray.get(worker.discard.remote(), timeout=1.0)
        actors = self.servers + workers
        for actor in actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + grace_s
        for actor in actors:
            _wait_dead(actor, deadline)
        if self.local:  # what a worker killed mid-write may have left
            for i in range(self.config.workers):
                self.scratch(i).unlink(missing_ok=True)
        if self.group is not None:
            remove_placement_group(self.group)


def _wait_dead(actor: ActorHandle, deadline: float) -> None:
    """Until Ray reports the killed actor gone (ray.kill returns before it is)."""
    while time.monotonic() < deadline:
        try:
            ray.get(actor.where.options(max_task_retries=0).remote(),
                    timeout=max(0.1, deadline - time.monotonic()))
        except RayActorError:
            return
        except GetTimeoutError:
            break
        time.sleep(0.05)  # polling Ray for the actor's death, with a deadline


def kill_server_actor(actor: ActorHandle) -> None:
    """An injected fault: kill a server actor the way a crash would, leaving Ray to restart
    it (if its max_restarts allow) from its newest checkpoint, on the same node and port."""
    ray.kill(actor, no_restart=False)


def launch_ray(config: LaunchConfig, progress: Progress | None = None,
               ray_address: str | None = None) -> tuple[dict, Path]:
    """Run the cluster of `config` as Ray actors to the end; return (summary, run directory).

    Joins the Ray instance this process has already initialised, else ray.init(ray_address)
    (None: a new local instance, shut down again at the end).
    """
    plan = prepare_launch(config)
    config = plan.config
    ours = not ray.is_initialized()
    if ours:
        ray.init(address=ray_address, log_to_driver=False)
    run = _RayRun(config, plan.run_dir, plan.checkpoints, plan.steps, plan.started)
    try:
        run.reserve()
        run.start_actors(restore=config.resume is not None)
        for i in range(config.workers):
            run.start_worker(i)
        records = run.supervise(progress)
        summary, params = run.finish(plan.data, plan.placement, records)
        summary.update(privacy.spent(config, plan.shard_sizes,
                                     privacy.steps_made(records, config.workers,
                                                        resumed=plan.resumed is not None)))
    finally:
        run.end()
        if ours:
            ray.shutdown()

    write_results(plan.run_dir, records, summary, params, config, plan.data, plan.placement)
    return summary, plan.run_dir
