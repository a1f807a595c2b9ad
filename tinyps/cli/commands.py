"""The `tinyps` commands: one short function each, over the library.

Each takes the parsed arguments and returns an exit code. The command owns the terminal
(progress bars, tables) and the process (signal handlers, malloc tuning, dying with its
launcher); the library never prints and never changes process-wide settings.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from ps.client import PSClient
from ps.memory import keep_freed_buffers
from ps.placement import TensorSpec
from ps.security import SecurityConfig
from ps.server import ServerConfig, serve
from ps.settings import from_flat, leaves
from tinyps import roles
from tinyps.cli.flags import settings_from
from tinyps.config import LaunchConfig
from tinyps.processes import die_with_parent
from tinyps.progress import StepBar
from tinyps.status import status_table
from tinyps.summary import format_summary
from worker.data import load_dataset
from worker.model import MLP
from worker.process import WorkerSettings, run_worker_process
from worker.quality import data_report as build_data_report
from worker.quality import format_report, save_report
from worker.settings import TrainConfig

__all__ = ["data_report", "launch", "placement", "server", "status", "train", "worker"]


def launch(args: argparse.Namespace) -> int:
    from tinyps.launcher import launch as run
    from tinyps.launcher import model_placement

    config = LaunchConfig.from_flat(settings_from(args, LaunchConfig))
    keep_freed_buffers()  # this process pulls the final model: see ps/memory.py
    data = load_dataset(config.train.dataset, seed=config.train.seed)
    print(model_placement(config, data).table(), flush=True)
    with StepBar(config.mode) as bar:
        summary, run_dir = run(config, progress=bar)
    print(format_summary(summary, run_dir))
    if args.json:
        print(json.dumps(summary))
    return 0


def _given(args: argparse.Namespace, kind: type, spec_keys: tuple[str, ...]) -> list[str]:
    """The settings typed as flags (the token's environment default aside)."""
    return sorted(name for name in leaves(kind)
                  if hasattr(args, name) and name not in spec_keys)


def _settings(args: argparse.Namespace, kind: type, from_spec,
              spec_keys: tuple[str, ...] = ()):
    """A process's settings: from --settings (JSON, as the launcher gives them), from a
    cluster spec (`spec_keys`: the flags that pick this process in it), or from flags; never
    from a mix of them."""
    sources = [s for s in ("settings", "cluster") if getattr(args, s) is not None]
    if len(sources) > 1 or (sources and _given(args, kind, spec_keys)):
        typed = _given(args, kind, spec_keys)
        raise ValueError(f"give --{sources[0]} alone, or settings as flags: not both "
                         f"({', '.join(sources[1:] + typed)})")
    token = settings_from(args, SecurityConfig).get("token")
    if args.settings is not None:
        text = sys.stdin.read() if str(args.settings) == "-" else args.settings.read_text()
        return roles.from_json(kind, text, token)
    if args.cluster is not None:
        return from_spec(token)
    return from_flat(kind, settings_from(args, kind), where=f"tinyps {args.command}")


def server(args: argparse.Namespace) -> int:
    def from_spec(token: str | None) -> ServerConfig:
        from tinyps.spec import ClusterSpec

        if args.index is None:
            raise ValueError("--cluster needs --index (which of the spec's servers this is)")
        return ClusterSpec.load(args.cluster).server_config(args.index, token=token)

    config = _settings(args, ServerConfig, from_spec)
    die_with_parent()
    keep_freed_buffers()
    running = serve(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    print(f"tinyps server: {config.store.mode} for {config.store.workers} workers on "
          f"{running.address}", file=sys.stderr, flush=True)
    if args.ready_file is not None:  # written whole, then renamed: a reader never sees half
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(running.address + "\n")
        tmp.replace(args.ready_file)
    running.wait()
    print("tinyps server: stopped", file=sys.stderr, flush=True)
    return 0


def worker(args: argparse.Namespace) -> int:
    spec = None

    def from_spec(token: str | None) -> WorkerSettings:
        nonlocal spec
        from tinyps.spec import ClusterSpec

        spec = ClusterSpec.load(args.cluster)
        return spec.worker_settings(args.index, token=token)

    if args.run_dir is not None and args.cluster is None:
        raise ValueError("--run-dir is for a worker of a --cluster spec")
    if args.cluster is not None and not hasattr(args, "index"):
        raise ValueError("--cluster needs --index (which of the spec's workers this is)")
    if args.run_dir is not None and args.index != 0:
        raise ValueError("--run-dir is for worker 0, which writes the run's summary")
    settings = _settings(args, WorkerSettings, from_spec, spec_keys=("index",))
    die_with_parent()
    keep_freed_buffers()
    records = run_worker_process(settings)
    last = records[-1] if records else None
    print(f"tinyps worker {settings.index}: {len(records)} steps"
          + (f", last loss {last.loss:.4f}" if last else ""), file=sys.stderr)
    if spec is not None and args.run_dir is not None:
        from tinyps.spec import finish_run

        summary = finish_run(spec, args.run_dir, [r.as_dict() for r in records],
                             settings.security.token)
        print(format_summary(summary, args.run_dir), flush=True)
    return 0


def status(args: argparse.Namespace) -> int:
    security = from_flat(SecurityConfig, settings_from(args, SecurityConfig))
    with PSClient(list(args.addresses), token=security.token, tls=security.tls(client=True),
                  deadline_s=5.0, retry_s=2.0) as client:
        previous, before = None, time.monotonic()
        while True:
            stats = client.stats()
            now = time.monotonic()
            table = status_table(stats, previous, now - before)
            if args.once:
                print(table)
                return 0
            print("\x1b[2J\x1b[H" + table, flush=True)  # clear the screen, then draw
            previous, before = stats, now
            time.sleep(args.interval)  # the refresh interval of a live view


def placement(args: argparse.Namespace) -> int:
    config = LaunchConfig.from_flat(settings_from(args, LaunchConfig))
    data = load_dataset(config.train.dataset)
    model = MLP((data.n_features, *config.train.hidden, data.n_classes))
    specs = [TensorSpec(n, s) for n, s in model.param_shapes().items()]
    print(config.placement.place(specs, config.servers).table())
    return 0


def data_report(args: argparse.Namespace) -> int:
    split = from_flat(LaunchConfig, settings_from(args, LaunchConfig)).split
    seed = getattr(args, "seed", 0)
    report = build_data_report(args.dataset, workers=args.workers, partition=split.partition,
                               alpha=split.alpha, seed=seed,
                               min_class_share=args.min_class_share)
    print(format_report(report))
    paths = save_report(report, args.out)
    if args.plot:
        from tinyps.report import plot_shards

        paths.append(plot_shards(report, args.out / "data_report.png"))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def train(args: argparse.Namespace) -> int:
    from tinyps.baseline import run_baseline

    config = from_flat(TrainConfig, settings_from(args, TrainConfig), where="tinyps train")
    with StepBar("train") as bar:
        result, run_dir = run_baseline(config, run_dir=args.run_dir, on_step=bar.step)
    print(f"{config.dataset}: test accuracy {result.test_accuracy:.2%}, test loss "
          f"{result.test_loss:.4f}, {result.steps} steps in {result.wall_s:.1f} s "
          f"({result.samples_per_s:,.0f} samples/s); written to {run_dir}")
    if args.json:
        print(json.dumps(result.summary()))
    return 0

