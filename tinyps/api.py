"""The Python API that notebooks use: run a whole cluster, or keep one up for hands-on cells.

    summary, run_dir = tinyps.launch(workers=2, mode="async", epochs=5)

    with tinyps.cluster(servers=2, workers=1) as c:    # servers only: you are the worker
        client = c.client()
        client.init(params, "sgd", lr=0.1)
        ...

Both take the settings of `tinyps launch` (LaunchConfig) and always stop their processes.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

from ps.client import PSClient
from tinyps.config import LaunchConfig
from tinyps.launcher import launch as _launch
from tinyps.launcher import prepare_run_dir, start_servers
from tinyps.processes import Child, end_all
from tinyps.status import status_table

__all__ = ["Cluster", "cluster", "launch"]


def _config(config: LaunchConfig | None, settings: dict) -> LaunchConfig:
    if config is None:
        return LaunchConfig(**settings)
    return dataclasses.replace(config, **settings) if settings else config


def launch(config: LaunchConfig | None = None, *, progress: bool = False,
           **settings) -> tuple[dict, Path]:
    """Run a cluster to the end, as `tinyps launch` does; return (summary, run directory).

    Settings are LaunchConfig fields, given as a config, as keywords, or both (keywords win).
    progress=True shows a progress bar (tqdm's, which notebooks render as a widget or text).
    """
    config = _config(config, settings)
    if not progress:
        return _launch(config)
    from tqdm.auto import tqdm

    bar = tqdm(unit="step", desc=config.mode)

    def show(done: int, total: int, losses: dict[int, float], rate: float) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.set_postfix_str(f"loss {sum(losses.values()) / len(losses):.4f}", refresh=False)
        bar.update(done - bar.n)

    try:
        return _launch(config, progress=show)
    finally:
        bar.close()


class Cluster:
    """Parameter servers running as processes on this machine, with no workers: you are one.

    Use it as a context manager (or call close()): the servers always stop.
    """

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.run_dir = (Path(config.run_dir) if config.run_dir
                        else Path("runs") / f"{stamp}-cluster-{config.mode}")
        prepare_run_dir(self.run_dir)
        # Marks the folder as a tinyps run's, so that the next cluster may reuse it.
        (self.run_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        self._children: list[Child]
        self._children, self.addresses = start_servers(config, self.run_dir)
        self._clients: list[PSClient] = []

    def client(self, worker_id: int = 0, **options) -> PSClient:
        """A PSClient of these servers as worker `worker_id` (closed with the cluster)."""
        options.setdefault("token", self.config.token)
        options.setdefault("tls", self.config.tls(client=True))
        client = PSClient(self.addresses, worker_id=worker_id, **options)
        self._clients.append(client)
        return client

    def stats(self) -> list[dict]:
        with PSClient(self.addresses, token=self.config.token,
                      tls=self.config.tls(client=True)) as client:
            return client.stats()

    def status(self) -> str:
        """The `tinyps status` table, once."""
        return status_table(self.stats())

    def close(self) -> None:
        for client in self._clients:
            client.close()
        end_all(self._children)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cluster(config: LaunchConfig | None = None, **settings) -> Cluster:
    """Start the servers of a LaunchConfig (keywords as in launch) and return them running."""
    return Cluster(_config(config, settings))
