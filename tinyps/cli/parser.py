"""The `tinyps` argument parser: its commands, each with the flags of the settings it takes.

The settings' flags come from their fields (tinyps.cli.flags); the few flags here are not
settings of a run but of one command (where a ready file goes, print JSON, ...).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

from ps.security import SecurityConfig
from ps.server import ServerConfig
from tinyps.cli.flags import add_settings
from tinyps.config import LaunchConfig
from worker.process import WorkerSettings
from worker.settings import SplitConfig, TrainConfig

__all__ = ["build_parser"]


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """Command `name` of tinyps.cli.MODULE, imported when it runs: a server or worker process
    (tinyps.cli.process) does not load the launcher, the report's plotting or the data
    tools (tinyps.cli.cluster)."""
    def run(args: argparse.Namespace) -> int:
        return getattr(import_module(f"tinyps.cli.{module}"), name)(args)

    return run


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
        return value

    return parse


def _spec_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--settings", type=Path, default=None, metavar="FILE",
                   help=f"take every setting from this JSON file (- : standard input), as the "
                        f"launcher hands a {kind} its settings")
    p.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                   help="take every setting from this cluster spec (JSON; see "
                        "docs/multi-host.md)")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--worker 2` for `--workers 2` must be an error, not a guess, and a
    # flag added later must not silently change what an old abbreviation meant.
    parser = argparse.ArgumentParser(
        prog="tinyps", description="A parameter-server training system for teaching.",
        allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser,
                                                               allow_abbrev=False))

    launch = sub.add_parser(
        "launch", help="start a cluster on this machine and train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n"
               "  0    trained as asked\n"
               "  1    failed: a process failed or could not start, or the run directory\n"
               "       cannot be written\n"
               "  2    refused before anything started: a bad setting, or --resume with\n"
               "       nothing left to train\n"
               "  3    finished without a worker that died with no restarts left\n"
               "  4    finished, but the model diverged (non-finite test loss, non-finite\n"
               "       training loss in the last 10 steps, or a training loss that grew)\n"
               "  130  interrupted (Ctrl-C, SIGTERM): summary.json (interrupted: true) and\n"
               "       model.npz written; the command to resume is printed")
    add_settings(launch, LaunchConfig)
    launch.add_argument("--json", action="store_true",
                        help="print summary.json alone on standard output (the rest goes to "
                             "standard error)")
    launch.set_defaults(run=_command("cluster", "launch"))

    server = sub.add_parser("server", help="run one parameter server")
    add_settings(server, ServerConfig)
    server.add_argument("--ready-file", type=Path, default=None,
                        help="write HOST:PORT here once serving")
    _spec_flags(server, "server")
    server.add_argument("--index", type=_natural, default=None,
                        help="with --cluster: which of the spec's servers this is (binds the "
                             "address the spec gives it)")
    server.set_defaults(run=_command("process", "server"))

    worker = sub.add_parser("worker", help="run one worker against running servers")
    add_settings(worker, WorkerSettings)
    _spec_flags(worker, "worker")
    worker.add_argument("--run-dir", type=Path, default=None,
                        help="with --cluster, worker 0: write the run's summary here once "
                             "every worker is done")
    worker.set_defaults(run=_command("process", "worker"))

    status = sub.add_parser("status", help="show a running cluster, live")
    status.add_argument("addresses", nargs="+", help="server addresses HOST:PORT")
    status.add_argument("--once", action="store_true", help="print the table once and exit")
    status.add_argument("--interval", type=_positive(float), default=1.0,
                        help="seconds between refreshes (default: 1)")
    add_settings(status, SecurityConfig)
    status.set_defaults(run=_command("cluster", "status"))

    placement = sub.add_parser("placement", help="print where a model's tensors would go")
    placement.add_argument("--servers", type=_positive(int), default=2,
                           help="servers to place the model on (default: 2)")
    add_settings(placement, LaunchConfig, only=("dataset", "hidden", "model", "placement",
                                                "split_bytes"))
    placement.set_defaults(run=_command("cluster", "placement"))

    report = sub.add_parser(
        "data-report", help="a data set's quality, and its shards over W workers")
    report.add_argument("dataset", help="digits | synthetic | mnist:DIR | csv:PATH")
    report.add_argument("--workers", type=_positive(int), default=2,
                        help="shards to split the training set into (default: 2)")
    add_settings(report, SplitConfig)
    add_settings(report, TrainConfig, only=("seed",))
    report.add_argument("--min-class-share", type=_positive(float), default=None,
                        help="flag a class below this share (default: half an even share)")
    report.add_argument("--out", type=Path, default=Path("."),
                        help="where data_report.json and .txt go (default: here)")
    report.add_argument("--plot", action="store_true",
                        help="also draw the shards' class histograms (data_report.png)")
    report.set_defaults(run=_command("cluster", "data_report"))

    train = sub.add_parser(
        "train", help="train the model in this one process (the baseline for distributed runs)")
    add_settings(train, TrainConfig)
    train.add_argument("--run-dir", default=None,
                       help="where the run's files go (default: runs/<time>-train)")
    train.add_argument("--json", action="store_true",
                       help="print the result as JSON alone on standard output (the rest goes to "
                            "standard error)")
    train.set_defaults(run=_command("cluster", "train"))
    parser.commands = dict(sub.choices)  # name -> its parser, for docs/cli.md
    return parser
