"""tinyps: a parameter-server training system for teaching distributed deep learning.

The front door: `tinyps.launch(...)` runs a cluster to the end, `tinyps.cluster(...)` keeps
servers up for hands-on work, and the `tinyps` command does both from a terminal. Also here:
the names a student uses in every lab (the model, the data, the client, placement).

The names load on first use (PEP 562): `python -m tinyps` and every server and worker process
it starts import this file, and should not pay for the launcher, gRPC or Matplotlib.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the table below loads, for readers, editors and tests/test_layering.py
    from ps.client import PSClient, PSError
    from ps.placement import Placement, TensorSpec, place
    from tinyps.api import Cluster, RunResult, cluster, launch
    from tinyps.config import LaunchConfig
    from tinyps.outcome import LaunchInterrupted
    from tinyps.report import plot_shards
    from tinyps.rundir import load_model
    from worker.data import load_dataset
    from worker.dataset import Dataset
    from worker.model import MLP
    from worker.model_spec import build_model
    from worker.sequential import Sequential

__all__ = [
    "MLP",
    "Cluster",
    "Dataset",
    "LaunchConfig",
    "LaunchInterrupted",
    "PSClient",
    "PSError",
    "Placement",
    "RunResult",
    "Sequential",
    "TensorSpec",
    "build_model",
    "cluster",
    "launch",
    "load_dataset",
    "load_model",
    "place",
    "plot_shards",
]

# public name -> the module that defines it
_WHERE = {
    "MLP": "worker.model",
    "Cluster": "tinyps.api",
    "Dataset": "worker.dataset",
    "LaunchConfig": "tinyps.config",
    "LaunchInterrupted": "tinyps.outcome",
    "PSClient": "ps.client",
    "PSError": "ps.client",
    "Placement": "ps.placement",
    "RunResult": "tinyps.api",
    "Sequential": "worker.sequential",
    "TensorSpec": "ps.placement",
    "build_model": "worker.model_spec",
    "cluster": "tinyps.api",
    "launch": "tinyps.api",
    "load_dataset": "worker.data",
    "load_model": "tinyps.rundir",
    "place": "ps.placement",
    "plot_shards": "tinyps.report",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:  # an AttributeError lets `from tinyps import cli` find the module
        raise AttributeError(f"module 'tinyps' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup finds it without calling this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
