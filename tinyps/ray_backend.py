"""The Ray backend: the launcher's cluster with every server and worker a Ray actor.

Same supervisor, same settings, same run directory as the local backend; Ray places the
actors on its nodes, restarts a dead server actor in place, and ends them all at the end.
Actors receive their settings as the dataclasses themselves (the token in their environment).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
import uuid
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

from ps.client import wait_healthy
from ps.security import TOKEN_ENV
from tinyps import roles
from tinyps.plan import LaunchError, LaunchPlan
from tinyps.ray_actors import ServerActor, WorkerActor
from tinyps.supervisor import Backend, WorkerNews

__all__ = ["RayBackend", "kill_server_actor"]

_POLL_S = 0.1  # how often the driver asks the worker actors for their new step records
_MIN_SHARE = 0.01  # CPUs per actor below which the cluster is too small to be worth it


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


class RayBackend(Backend):
    """The actors of one run. Joins the Ray instance this process has already initialised,
    else ray.init(config.ray_address) (None: a new local instance, shut down at the end)."""

    poll_s = 0.1  # each poll asks every worker actor for its new step records
    restarts_servers_itself = True  # each server actor, up to max_restarts times

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.config = config = plan.config
        self._ours = not ray.is_initialized()
        if self._ours:
            ray.init(address=config.ray_address, log_to_driver=False)
        self.tag = uuid.uuid4().hex[:8]
        self.group: PlacementGroup | None = None
        self.share = 0.0
        self.local = True  # one node, this machine's: see _one_local_node
        self.servers: list[ActorHandle] = []
        self.addresses: list[str] = []
        self.workers: list[ActorHandle | None] = [None] * config.workers
        self._pids: list[int | None] = [None] * config.servers  # each server actor's process

    def _reserve(self) -> None:
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
        if self.config.security.token:
            env[TOKEN_ENV] = self.config.security.token  # never in an actor's arguments
        return dict(name=f"tinyps-{self.tag}-{name}", num_cpus=self.share,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=bundle),
                    runtime_env={"env_vars": env}, **options)

    def start_servers(self, restore: bool) -> list[str]:
        """Start the servers and wait until each is healthy; create the workers' actors."""
        config = self.config
        self._reserve()
        self.local = local = _one_local_node()
        for i in range(config.servers):
            settings = roles.server_config(config, i, checkpoints=self.plan.checkpoints,
                                           restore=restore)
            # Ray restarts each server actor itself, up to max_restarts times; calls to one
            # that is restarting wait for it rather than fail.
            options = self._options(f"server{i}", i, max_restarts=config.faults.max_restarts,
                                    max_task_retries=-1)
            self.servers.append(ray.remote(ServerActor).options(**options).remote(
                roles.without_secrets(settings), self.tag, not local))
        # Workers' actors start now too: their imports overlap the servers' start-up.
        self.workers = [self._create_worker(i) for i in range(config.workers)]
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
            (self.plan.run_dir / f"server{i}.address").write_text(address + "\n")
            self._log(f"server{i}", self.servers[i].where.remote())
        return self.addresses

    def _metrics(self, index: int) -> Path:
        return self.plan.run_dir / "metrics" / f"worker{index}.jsonl"

    def _create_worker(self, index: int) -> ActorHandle:
        # The supervisor restarts workers itself (as on the local backend, after a Leave).
        options = self._options(f"worker{index}", self.config.servers + index, max_restarts=0)
        return ray.remote(WorkerActor).options(**options).remote(self._scratch(index))

    def _scratch(self, index: int) -> Path:
        """Where worker `index` writes its step records on its node, for poll() to read."""
        return Path(tempfile.gettempdir()) / f"tinyps-{self.tag}-worker{index}.jsonl"

    def start_worker(self, index: int) -> None:
        """Run worker `index` in its actor (a new one if it died); wait until it started."""
        if self.workers[index] is None:
            self.workers[index] = self._create_worker(index)
        settings = roles.worker_settings(self.config, index, self.addresses,
                                         steps=self.plan.steps, start_time=self.plan.started)
        worker = self.workers[index]
        try:
            ray.get(worker.start.remote(roles.without_secrets(settings)),
                    timeout=self.config.startup_timeout_s)
        except GetTimeoutError:
            raise LaunchError(f"worker{index} not started after "
                              f"{self.config.startup_timeout_s:.0f} s") from None
        except RayActorError as err:
            raise LaunchError(f"worker{index}'s actor did not start: {err}") from None
        self._log(f"worker{index}", worker.where.remote())

    def _log(self, name: str, where: ray.ObjectRef) -> None:
        """A line in logs/NAME.log: where the actor runs (its own output is in Ray's logs)."""
        try:
            info = ray.get(where, timeout=self.config.startup_timeout_s)
            line = json.dumps(info)
            if name.startswith("server"):
                self._pids[int(name[len("server"):])] = info["pid"]
        except (GetTimeoutError, RayActorError) as err:
            line = f"not placed: {err}"
        with (self.plan.run_dir / "logs" / f"{name}.log").open("a") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {name} actor {line}\n")

    def poll(self, running: set[int]) -> tuple[list[dict], list[WorkerNews]]:
        records, news = [], []
        polls = {i: self.workers[i].poll.remote() for i in sorted(running)}
        for i, ref in polls.items():
            try:
                new, finished, error = ray.get(ref, timeout=self.config.startup_timeout_s)
            except RayActorError as err:
                cause = (str(err).strip().splitlines()[-1] if str(err).strip()
                         else type(err).__name__)
                self.workers[i] = None
                news.append(WorkerNews(i, died=cause))
                continue
            except GetTimeoutError:
                raise LaunchError(f"worker{i} did not answer for "
                                  f"{self.config.startup_timeout_s:.0f} s") from None
            with self._metrics(i).open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            records += new
            if error is not None:
                news.append(WorkerNews(i, failed=f"{self._dead_servers()}; its traceback "
                                                 f"ends:\n{error[-2000:]}"))
            elif finished:
                news.append(WorkerNews(i, finished=True))
        return records, news

    def server_restarts(self) -> int:
        return sum(n - 1 for n in self._starts())

    def _starts(self) -> list[int]:
        try:  # a server actor being restarted answers once it is back
            return ray.get([s.starts.remote() for s in self.servers],
                           timeout=self.config.startup_timeout_s)
        except (RayActorError, GetTimeoutError) as err:
            raise LaunchError(f"a server actor is gone: {err}") from None

    def _dead_servers(self) -> str:
        """For an error message: the server actors Ray has given up on, if any."""
        dead = []
        for i, server in enumerate(self.servers):
            try:
                ray.get(server.starts.remote(), timeout=5.0)
            except (RayActorError, GetTimeoutError):
                dead.append(f"server{i}")
        return f"(server actors dead for good: {', '.join(dead)})" if dead else ""

    def kill(self, kind: str, index: int, done: int) -> str | None:
        if kind == "server":
            kill_server_actor(self.servers[index])
            return (f"injected: ray.kill of server{index}'s actor after {done} steps; Ray "
                    f"restarts it")
        if self.workers[index] is None:
            return None
        ray.kill(self.workers[index], no_restart=True)
        return f"injected: ray.kill of worker{index}'s actor after {done} steps"

    def end_worker(self, index: int) -> None:
        ray.kill(self.workers[index], no_restart=True)

    def end_frozen_server(self, index: int) -> None:
        """As a crash would: Ray restarts it from its checkpoint, on its node and port. On
        this machine, SIGKILL to its process: ray.kill first asks the actor's own process to
        exit, which a stopped process never does."""
        pid = self._pids[index]
        if pid is None:  # restarted since: ask where it runs now (a frozen one cannot say)
            with contextlib.suppress(GetTimeoutError, RayActorError):
                pid = ray.get(self.servers[index].where.remote(), timeout=1.0)["pid"]
        self._pids[index] = None
        if self.local and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            kill_server_actor(self.servers[index])

    def wait_servers_stopped(self, timeout: float) -> list[int]:
        refs = [s.wait_stopped.remote(timeout) for s in self.servers]
        late = []
        for i, ref in enumerate(refs):
            try:
                if not ray.get(ref, timeout=timeout + 5):
                    late.append(i)
            except (GetTimeoutError, RayActorError):
                late.append(i)
        return late

    def checkpoints_written(self) -> int:
        return sum(ray.get([s.checkpoints_written.remote() for s in self.servers]))

    def final_events(self) -> list[str]:
        events = []
        for i, n in enumerate(self._starts()):
            if n > 1:
                events.append(f"server{i} restarted {n - 1} time(s) by Ray on "
                              f"{self.addresses[i]} from its checkpoint")
                self._log(f"server{i}", self.servers[i].where.remote())
        return events

    def close(self, grace_s: float = 10.0) -> None:  # (the actors are killed at once)
        """Kill every actor and wait until Ray reports each dead; free the placement group;
        shut Ray down if this backend started it."""
        try:
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
                    self._scratch(i).unlink(missing_ok=True)
            if self.group is not None:
                remove_placement_group(self.group)
        finally:
            if self._ours:
                ray.shutdown()


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
