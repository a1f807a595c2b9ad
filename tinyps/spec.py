"""Cluster specs: one JSON file that describes a cluster spread over several hosts.

Each process is started by hand on its own host (`tinyps server --cluster FILE --index i`,
`tinyps worker --cluster FILE --index j`) and takes its part of the file: the servers'
addresses, the number of workers, the mode and training settings, the TLS files. The token is
never in the file: every process reads it from --token or $TINYPS_TOKEN. A spec process gets
the same settings (tinyps.roles) the launcher would give it, so the two cannot differ.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ps.client import PSClient
from ps.server import ServerConfig
from tinyps import privacy, roles
from tinyps.config import LaunchConfig
from tinyps.plan import LaunchError, model_placement
from tinyps.rundir import write_config, write_results
from tinyps.supervisor import summarise
from worker.data import load_dataset
from worker.process import WorkerSettings, steps_for
from worker.shards import partition

__all__ = ["ClusterSpec", "finish_run"]

_POLL_S = 0.2  # how often worker 0 asks the servers whether the others are done


def _address(text: object, where: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not (isinstance(text, str) and sep and host and port.isdigit()
            and 0 < int(port) < 65536):
        raise ValueError(f"{where}: {text!r} is not HOST:PORT with a port in 1..65535")
    return host, int(port)


@dataclass(frozen=True)
class ClusterSpec:
    servers: tuple[str, ...]  # HOST:PORT of each server, in server order
    config: LaunchConfig  # everything else; config.servers == len(servers)

    @classmethod
    def load(cls, path: Path | str) -> ClusterSpec:
        """Read and check a spec file: {"servers": ["HOST:PORT", ...], LaunchConfig fields}."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cluster spec {path}: {err}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "cluster spec") -> ClusterSpec:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        data = dict(data)
        servers = data.pop("servers", None)
        if not isinstance(servers, list) or not servers:
            raise ValueError(f"{where}: \"servers\" must be a list of HOST:PORT addresses")
        for i, address in enumerate(servers):
            _address(address, f"{where}: servers[{i}]")
        if len(set(servers)) != len(servers):
            raise ValueError(f"{where}: the server addresses are not distinct: {servers}")
        if "token" in data:
            raise ValueError(f"{where}: a token never goes in the spec (it would be read by "
                             f"everyone who can read the file); give --token or $TINYPS_TOKEN")
        try:
            config = LaunchConfig.from_json({**data, "servers": len(servers)})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        return cls(tuple(servers), config)

    def _settled(self) -> LaunchConfig:
        """The config with DP's sigma settled, as every process must agree on it."""
        config = self.config
        if config.privacy.dp_target_epsilon is None or config.privacy.dp_noise is not None:
            return config
        data = load_dataset(config.train.dataset, seed=config.train.seed)
        sizes = [len(s) for s in partition(data, config.workers, config.split.partition,
                                           alpha=config.split.alpha, seed=config.train.seed)]
        return privacy.plan(config, sizes, self.steps(data))

    def steps(self, data=None) -> int:
        config = self.config
        if config.train.steps is not None:
            return config.train.steps
        data = data or load_dataset(config.train.dataset, seed=config.train.seed)
        return steps_for(len(data.X_train), config.workers, config.train.batch_size,
                         config.train.epochs)

    def _with_token(self, token: str | None) -> LaunchConfig:
        return self._settled().replace(token=token)

    def server_config(self, index: int, token: str | None = None,
                      host: str | None = None) -> ServerConfig:
        """Server `index`'s settings: it binds exactly its address in the spec (or `host`
        at that port). With a checkpoint folder it restores from it."""
        self._check_index(index, len(self.servers), "server")
        spec_host, port = _address(self.servers[index], f"servers[{index}]")
        folder = self.config.checkpoint.checkpoint_dir
        checkpoints = Path(folder) if folder else None
        return roles.server_config(self._with_token(token), index, port=port,
                                   host=host or spec_host, checkpoints=checkpoints,
                                   restore=checkpoints is not None)

    def worker_settings(self, index: int, token: str | None = None) -> WorkerSettings:
        """Worker `index`'s settings."""
        self._check_index(index, self.config.workers, "worker")
        return roles.worker_settings(self._with_token(token), index, self.servers,
                                     steps=self.config.train.steps)

    @staticmethod
    def _check_index(index: int, count: int, kind: str) -> None:
        if not 0 <= index < count:
            raise ValueError(f"--index {index}: the spec has {kind}s 0..{count - 1}")


def finish_run(spec: ClusterSpec, run_dir: Path, records: list[dict], token: str | None,
               timeout_s: float = 600.0) -> dict:
    """Worker 0's last task: once every worker has made its steps, write the run directory
    (config.json, summary.json, its own metrics.jsonl, model.npz, report.png).

    On several hosts only worker 0's step records are at hand; the servers' counters cover
    everyone. The servers keep running: stop them on their hosts (Ctrl-C or SIGTERM).
    """
    config = spec._settled()
    data = load_dataset(config.train.dataset, seed=config.train.seed)
    steps = spec.steps(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    with PSClient(list(spec.servers), token=token, tls=config.tls(client=True)) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            versions = client.versions()
            live = set().union(*(s["live_workers"] for s in client.stats()))
            clocks = [min(v["clocks"].get(w, 0) for v in versions) for w in live]
            if all(c >= steps for c in clocks):
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"workers still training after {timeout_s:.0f} s: clocks "
                                  f"{dict(zip(sorted(live), clocks, strict=True))} of {steps}")
            time.sleep(_POLL_S)  # polling the servers with a deadline, not synchronisation
        stats = client.stats()
        params = client.pull()
    placement = model_placement(config, data)
    # Worker 0's own span: the processes of a spec share no clock origin.
    span = (max(r["time"] for r in records) - min(r["pulled"] for r in records)
            if records else 0.0)
    summary = summarise(config, data, placement, records, stats, params, span, steps)
    summary["cluster"] = list(spec.servers)
    saved = {k: v for k, v in config.to_json().items() if k != "token"}
    saved["servers"] = list(spec.servers)  # config.json is a spec for the same cluster
    write_config(run_dir, saved)
    write_results(run_dir, records, summary, params, config, data, placement)
    return summary
