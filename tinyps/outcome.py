"""What a run's end means, as torchrun's exit codes say it: trained as asked, lost a worker,
diverged, failed, interrupted; and the exact command that resumes an interrupted run.

`tinyps launch` exits with these codes, and `tinyps.launch` gives them back in its RunResult.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ps.settings import default_of, leaves, to_flat
from tinyps.config import LaunchConfig

__all__ = ["EXIT_DIVERGED", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE",
           "EXIT_WORKER_LOST", "LaunchInterrupted", "outcome", "resume_command"]

EXIT_OK = 0  # trained as asked
EXIT_FAILED = 1  # a process failed, could not start, or the run directory cannot be written
EXIT_USAGE = 2  # bad settings, or nothing left to train: refused before anything started
EXIT_WORKER_LOST = 3  # finished, but without a worker that died with no restarts left
EXIT_DIVERGED = 4  # finished, but the model diverged (summary.json's "diverged_reason")
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what there was is written, and can be resumed

# Settings that a resume command does not repeat: where this run went, what it resumed, and
# the faults injected into it (a resumed run would suffer them again).
_NOT_REPEATED = ("run_dir", "resume", "checkpoint_dir", "token", "kill_server", "kill_worker")


class LaunchInterrupted(KeyboardInterrupt):
    """A launch stopped by Ctrl-C or SIGTERM, after it wrote what it had: raised by
    tinyps.launch (a KeyboardInterrupt still, so that a notebook cell stops as it should)."""

    def __init__(self, summary: dict, run_dir: Path, message: str) -> None:
        super().__init__(message)
        self.summary = summary
        self.run_dir = run_dir
        self.message = message


def outcome(summary: dict) -> tuple[int, str]:
    """(exit code, what happened in one line) of a run from its summary."""
    if summary.get("interrupted"):
        return EXIT_INTERRUPTED, (f"interrupted after {summary.get('steps_done', 0)} steps "
                                  f"of {summary.get('steps_this_launch', '?')} per worker x "
                                  f"{summary.get('workers', '?')} workers")
    troubles = []
    code = EXIT_OK
    if summary.get("workers_lost"):
        lost = ", ".join(f"worker{w}" for w in summary["workers_lost"])
        troubles.append(f"lost {lost} for good (no restarts left): the others finished the "
                        f"run")
        code = EXIT_WORKER_LOST
    if summary.get("diverged"):
        troubles.append(f"the model diverged: {summary.get('diverged_reason') or 'its loss grew'}")
        code = code or EXIT_DIVERGED
    if not troubles:
        return EXIT_OK, "trained as asked"
    return code, "; ".join(troubles)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[1], float):  # I:FACTOR
            return f"{value[0]}:{value[1]:g}"
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_command(config: LaunchConfig, source: Path) -> str:
    """`tinyps launch --resume SOURCE` with every setting of `config` that differs from its
    default (a resumed run must have the same mode, workers, batch, ...)."""
    args = ["tinyps", "launch", "--resume", str(source)]
    values = to_flat(config)
    for name, leaf in leaves(LaunchConfig).items():
        value, default = values[name], default_of(leaf)
        if name in _NOT_REPEATED or value == default or value is None:
            continue
        flag = leaf.field.metadata.get("flag") or "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, _shown(value)]
    return shlex.join(args)
