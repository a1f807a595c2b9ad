"""tinyps: a parameter-server training system for teaching distributed deep learning.

The front door: `tinyps.launch(...)` runs a cluster to the end, `tinyps.cluster(...)` keeps
servers up for hands-on work, and the `tinyps` command does both from a terminal.
"""

from tinyps.api import Cluster, RunResult, cluster, launch
from tinyps.config import LaunchConfig
from tinyps.rundir import load_model

__all__ = ["Cluster", "LaunchConfig", "RunResult", "cluster", "launch", "load_model"]
