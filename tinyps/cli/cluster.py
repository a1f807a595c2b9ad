"""The commands a user runs on a whole cluster or model: launch, status, placement,
data-report and train.

Each takes the parsed arguments and returns an exit code; the command owns the terminal
(progress bars, tables), the library never prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ps.client import PSClient, PSError
from ps.memory import keep_freed_buffers
from ps.placement import TensorSpec
from ps.security import SecurityConfig
from ps.settings import from_flat
from tinyps.baseline import run_baseline
from tinyps.cli.flags import settings_from
from tinyps.config import LaunchConfig
from tinyps.launcher import launch as run_launch
from tinyps.outcome import EXIT_INTERRUPTED, EXIT_OK, LaunchInterrupted, outcome
from tinyps.plan import LaunchPlan
from tinyps.progress import StepBar
from tinyps.status import status_table
from tinyps.summary import format_summary
from worker.data import load_dataset
from worker.model_spec import build_model
from worker.quality import data_report as build_data_report
from worker.quality import format_report, save_report
from worker.settings import TrainConfig

__all__ = ["data_report", "launch", "placement", "status", "train"]


def launch(args: argparse.Namespace) -> int:

    config = LaunchConfig.from_flat(settings_from(args, LaunchConfig))
    keep_freed_buffers()  # this process pulls the final model: see ps/memory.py
    # With --json, standard output holds the JSON document alone (for jq and scripts); what
    # a person reads goes to standard error.
    human = sys.stderr if args.json else sys.stdout

    def show_plan(plan: LaunchPlan) -> None:
        print(plan.placement.table(), file=human, flush=True)
        for note in (*plan.resume_notes, *plan.warnings):
            print(f"tinyps launch: {note}", file=sys.stderr, flush=True)

    with StepBar(config.mode) as bar:
        try:
            summary, run_dir = run_launch(config, progress=bar, on_event=bar.note,
                                          on_plan=show_plan)
        except LaunchInterrupted as stop:
            bar.close()
            print(format_summary(stop.summary, stop.run_dir), file=human, flush=True)
            print(f"tinyps launch: {stop.message}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    print(format_summary(summary, run_dir), file=human, flush=True)
    if args.json:
        print(json.dumps(summary))
    code, message = outcome(summary)
    if code != EXIT_OK:
        print(f"tinyps launch: {message} (exit code {code})", file=sys.stderr)
    return code


_STATUS_DEADLINE_S = 3.0  # a server that has not answered by then is shown as not answering


def _server_stats(clients: list[PSClient]) -> list[dict]:
    """Each server's counters, asked of all at once; one that does not answer within the
    deadline (frozen, overloaded, down) is a row that says so, not a hang."""
    def ask(i: int) -> dict:
        try:
            return dict(clients[i].stats()[0], index=i)
        except PSError as err:
            return {"index": i, "address": clients[i].addresses[0],
                    "error": f"{err.code.name} within {_STATUS_DEADLINE_S:g} s (frozen, "
                             f"overloaded or down?)"}

    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        return list(pool.map(ask, range(len(clients))))


def status(args: argparse.Namespace) -> int:
    security = from_flat(SecurityConfig, settings_from(args, SecurityConfig))
    clients = [PSClient([address], token=security.token, tls=security.tls(client=True),
                        deadline_s=_STATUS_DEADLINE_S, retry_s=_STATUS_DEADLINE_S / 2)
               for address in args.addresses]
    try:
        previous, before = None, time.monotonic()
        while True:
            stats = _server_stats(clients)
            now = time.monotonic()
            table = status_table(stats, previous, now - before)
            if args.once:
                print(table)
                return 1 if any("error" in s for s in stats) else 0
            print("\x1b[2J\x1b[H" + table, flush=True)  # clear the screen, then draw
            previous, before = stats, now
            time.sleep(args.interval)  # the refresh interval of a live view
    finally:
        for client in clients:
            client.close()


def placement(args: argparse.Namespace) -> int:
    config = LaunchConfig.from_flat(settings_from(args, LaunchConfig))
    data = load_dataset(config.train.dataset)
    model = build_model(config.train, data.n_features, data.image_shape, data.n_classes)
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
    config = from_flat(TrainConfig, settings_from(args, TrainConfig), where="tinyps train")
    keep_freed_buffers()  # as a worker's process does: the baseline is like for like
    with StepBar("train") as bar:
        result, run_dir = run_baseline(config, run_dir=args.run_dir, on_step=bar.step)
    print(f"{config.dataset}: test accuracy {result.test_accuracy:.2%}, test loss "
          f"{result.test_loss:.4f}, {result.steps} steps in {result.wall_s:.1f} s "
          f"({result.samples_per_s:,.0f} samples/s); written to {run_dir}",
          file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the JSON alone
    if args.json:
        print(json.dumps(result.summary()))
    return 0
