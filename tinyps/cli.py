"""The `tinyps` command: one sub-command per job, each a thin layer over the library.

    tinyps launch     a whole cluster on this machine, with a progress bar and a report
    tinyps server     one parameter server          tinyps worker     one worker
    tinyps status     a running cluster, live       tinyps placement  where tensors would go
    tinyps train      the single-process baseline

The command owns the terminal (progress bars, tables, exit codes); the library never prints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the command starts without loading what it needs not
    from worker.process import WorkerSettings

__all__ = ["build_parser", "main"]


# -- argument types: each names the problem in its message ------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    """Parse a comma list of positive widths such as "128" or "256,128"."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected widths >= 1, got {text!r}")
    return values


def _int_at_least(minimum: int):
    """An argument type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_natural = _int_at_least(0)


def _float_above(minimum: float, inclusive: bool, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = value >= minimum if inclusive else value > minimum
        if not ok or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a {what} finite number, got {text!r}")
        return value

    return parse


_positive_float = _float_above(0.0, inclusive=False, what="positive")
_non_negative_float = _float_above(0.0, inclusive=True, what="non-negative")


def _slow_worker(text: str) -> tuple[int, float]:
    index, sep, factor = text.partition(":")
    try:
        if not sep:
            raise ValueError
        parsed = (int(index), float(factor))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WORKER:FACTOR such as 1:5, got {text!r}") from None
    if parsed[0] < 0 or not parsed[1] >= 1:
        raise argparse.ArgumentTypeError(f"expected a worker >= 0 and a factor >= 1, got {text!r}")
    return parsed


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _addresses(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        host, sep, port = p.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {p!r}")
    if not parts:
        raise argparse.ArgumentTypeError("expected at least one HOST:PORT")
    return parts


# -- the parser ---------------------------------------------------------------------------


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits | synthetic | mnist:DIR | csv:PATH (default: digits)")
    p.add_argument("--hidden", type=_int_list, default=(128,),
                   help="hidden layer widths, comma separated (default: 128)")


def _training_flags(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs,
                   help=f"passes over the training set (default: {epochs})")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="examples per step, per worker (default: 32)")
    p.add_argument("--lr", type=_positive_float, default=lr, help=f"step size (default: {lr})")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd",
                   help="the servers' update rule, with PyTorch's semantics (default: sgd)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="for --optimizer momentum (default: 0.9)")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the model's start, the data split and the batch order")


def _consistency_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("sync", "async", "ssp"), default="sync",
                   help="sync: a barrier per step; async: apply on arrival; ssp: bounded "
                        "staleness (default: sync)")
    p.add_argument("--staleness", type=_natural, default=0,
                   help="ssp's bound K: no worker more than K steps ahead of the slowest")
    p.add_argument("--staleness-lr", action="store_true",
                   help="async/ssp: divide each step by its gradient's staleness "
                        "(Zhang et al. 2016)")
    p.add_argument("--max-staleness", type=_natural, default=None,
                   help="async/ssp: drop gradients staler than this (counted)")


def _aggregate(text: str) -> str:
    from ps.store import parse_aggregate

    try:
        parse_aggregate(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _index_after(text: str) -> tuple[int, int]:
    index, sep, after = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(index), int(after)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected INDEX:STEPS, as in 1:40, got {text!r}") from None


def _dp_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dp-noise", type=_non_negative_float, default=None, metavar="SIGMA",
                   help="DP-SGD: Gaussian noise of std SIGMA*C on each clipped sum")
    p.add_argument("--dp-clip", type=_positive_float, default=1.0, metavar="C",
                   help="DP-SGD: clip each example's gradient to this L2 norm (default: 1)")
    p.add_argument("--dp-delta", type=_positive_float, default=1e-5,
                   help="DP-SGD: the delta of (epsilon, delta) (default: 1e-5)")
    p.add_argument("--dp-noise-at", choices=("worker", "server"), default="worker",
                   help="worker: each worker noises its push; server: sync servers noise "
                        "the aggregate once (a trusted aggregator)")
    p.add_argument("--dp-seed", type=int, default=None,
                   help="seed the DP noise (repeatable runs; default: secret OS entropy)")


def _poison(text: str) -> str:
    from worker.poison import parse_poison

    try:
        parse_poison(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _sync_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backup-workers", type=_natural, default=0,
                   help="sync: each step takes the first W-b gradients and drops the late "
                        "ones (Chen et al. 2016)")
    p.add_argument("--aggregate", type=_aggregate, default="mean",
                   help="sync: mean | median | trimmed_mean:F (F cut from each end), the "
                        "last two robust to Byzantine workers")


def _checkpoint_flags(p: argparse.ArgumentParser, directory_help: str) -> None:
    p.add_argument("--checkpoint-dir", type=Path, default=None, help=directory_help)
    p.add_argument("--checkpoint-every", type=_positive_int, default=100,
                   help="a server writes its shard every N updates (default: 100)")
    p.add_argument("--keep-checkpoints", type=_positive_int, default=3,
                   help="checkpoints kept per server (default: 3)")
    p.add_argument("--lease", type=_positive_float, default=30.0,
                   help="seconds a worker may stay silent before barriers stop waiting for "
                        "it (default: 30)")


def _loss_scale(text: str) -> float | str:
    if text in ("auto", "dynamic", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, dynamic, off or a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a static loss scale must be positive, got {text!r}")
    return value


def _precision_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="worker compute and wire format; servers keep fp32 master weights")
    p.add_argument("--loss-scale", type=_loss_scale, default="auto",
                   help="auto (dynamic for fp16, off for bf16), dynamic, off, or a static "
                        "scale such as 1024")
    p.add_argument("--init-scale", type=_positive_float, default=65536.0,
                   help="dynamic loss scaling: the first scale (default: 65536)")
    p.add_argument("--growth-interval", type=_positive_int, default=2000,
                   help="dynamic loss scaling: good steps in a row that double the scale "
                        "(default: 2000)")


def _security_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=os.environ.get("TINYPS_TOKEN"),
                   help="shared token checked on every call (default: $TINYPS_TOKEN)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate of the servers")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM key of that certificate")
    p.add_argument("--tls-ca", type=Path, default=None,
                   help="PEM CA: servers demand client certificates it signed (mutual TLS)")


def _placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--placement", default="size_balanced",
                   help="round_robin | size_balanced | per layer, e.g. dense0=1,dense1=0")
    p.add_argument("--split-bytes", type=_positive_int, default=None,
                   help="split tensors larger than this many bytes into row ranges")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyps", description="A parameter-server training system for teaching.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    launch = commands.add_parser("launch", help="start a cluster on this machine and train")
    launch.add_argument("--servers", type=_positive_int, default=2,
                        help="parameter-server processes (default: 2)")
    launch.add_argument("--workers", type=_positive_int, default=2,
                        help="worker processes (default: 2)")
    _consistency_flags(launch)
    _model_flags(launch)
    _training_flags(launch, epochs=20, lr=0.1)
    launch.add_argument("--steps", type=_positive_int, default=None,
                        help="steps per worker (overrides --epochs)")
    _placement_flags(launch)
    launch.add_argument("--partition", choices=("iid", "label_skew"), default="iid",
                        help="how the training set is split into the workers' shards")
    launch.add_argument("--alpha", type=_positive_float, default=0.5,
                        help="label_skew's Dirichlet concentration (smaller: more skew)")
    launch.add_argument("--slow-worker", type=_slow_worker, default=None, metavar="I:FACTOR",
                        help="make worker I compute FACTOR times slower (a straggler)")
    _precision_flags(launch)
    launch.add_argument("--no-fused", dest="fused", action="store_false",
                        help="pull and push in two calls instead of one PushPull")
    launch.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                        help="every call through gRPC, tensors in the messages: no "
                             "shared-memory mailbox, no local socket")
    _sync_flags(launch)
    _checkpoint_flags(launch, "where servers write checkpoints (default: RUN_DIR/checkpoints)")
    launch.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its checkpoints (the number of "
                             "servers may differ)")
    launch.add_argument("--max-restarts", type=_natural, default=3,
                        help="dead servers and killed workers restarted, in all (default: 3)")
    launch.add_argument("--byzantine", type=_natural, default=0, metavar="N",
                        help="injected fault: workers 0..N-1 push their gradient times -10")
    launch.add_argument("--poison-workers", type=_natural, default=0, metavar="N",
                        help="injected fault: workers 0..N-1 are poisoned (see --poison)")
    launch.add_argument("--poison", type=_poison, default="scaled_gradient:-10",
                        help="label_flip | random_labels | scaled_gradient:F "
                             "(default: scaled_gradient:-10)")
    _dp_flags(launch)
    launch.add_argument("--dp-target-epsilon", "--target-epsilon", type=_positive_float,
                        default=None,
                        metavar="E", help="DP-SGD: choose sigma so that the planned steps "
                                          "spend epsilon E")
    launch.add_argument("--kill-server", type=_index_after, default=None, metavar="I:STEPS",
                        help="injected fault: SIGKILL server I after STEPS steps in all")
    launch.add_argument("--kill-worker", type=_index_after, default=None, metavar="J:STEPS",
                        help="injected fault: SIGKILL worker J after STEPS steps in all")
    _security_flags(launch)
    launch.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: processes on this machine; ray: Ray actors on the nodes "
                             "of a Ray cluster (pip install 'tinyps[ray]')")
    launch.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="--backend ray: the Ray cluster to join (default: start one here)")
    launch.add_argument("--run-dir", default=None, help="default: runs/<time>-<mode>-...")
    launch.add_argument("--json", action="store_true",
                        help="print summary.json as the last line of standard output")
    launch.set_defaults(run=_run_launch)

    server = commands.add_parser("server", help="run one parameter server")
    server.add_argument("--host", default=None,
                        help="the address to bind (default: 127.0.0.1, this machine only)")
    server.add_argument("--port", type=_natural, default=0, help="0: a free port")
    server.add_argument("--workers", type=_positive_int, default=1,
                        help="how many workers push: a sync step waits for all of them")
    _consistency_flags(server)
    _sync_flags(server)
    _checkpoint_flags(server, "this server's checkpoint folder (default: no checkpoints)")
    server.add_argument("--restore", action="store_true",
                        help="start from the newest checkpoint in --checkpoint-dir, if any")
    server.add_argument("--dp-noise-std", type=_non_negative_float, default=0.0,
                        help="sync: add N(0, s^2) to each step's sum of gradients (DP-SGD "
                             "noise from a trusted aggregator)")
    server.add_argument("--dp-seed", type=int, default=None,
                        help="seed that noise (default: secret OS entropy)")
    _security_flags(server)
    server.add_argument("--ready-file", type=Path, default=None,
                        help="write HOST:PORT here once serving")
    server.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                        help="take every setting from this cluster spec (JSON; see "
                             "docs/multi-host.md) and bind the address it gives --index")
    server.add_argument("--index", type=_natural, default=None,
                        help="with --cluster: which of the spec's servers this is")
    server.set_defaults(run=_run_server)

    worker = commands.add_parser("worker", help="run one worker against running servers")
    worker.add_argument("--servers", type=_addresses, default=None,
                        help="server addresses, comma separated, in server order")
    worker.add_argument("--index", type=_natural, required=True, help="this worker's id")
    worker.add_argument("--workers", type=_positive_int, default=None,
                        help="how many workers share the data")
    worker.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                        help="take every setting from this cluster spec (JSON)")
    worker.add_argument("--run-dir", type=Path, default=None,
                        help="with --cluster, worker 0: write the run's summary here once "
                             "every worker is done")
    _model_flags(worker)
    _training_flags(worker, epochs=20, lr=0.1)
    worker.add_argument("--steps", type=_positive_int, default=None,
                        help="steps for this worker (overrides --epochs)")
    _placement_flags(worker)
    worker.add_argument("--partition", choices=("iid", "label_skew"), default="iid",
                        help="how the training set is split (every worker must agree)")
    worker.add_argument("--alpha", type=_positive_float, default=0.5,
                        help="label_skew's Dirichlet concentration")
    worker.add_argument("--slowdown", type=float, default=1.0,
                        help="compute this many times slower (an injected straggler)")
    worker.add_argument("--no-fused", dest="fused", action="store_false",
                        help="pull and push in two calls instead of one PushPull")
    worker.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                        help="every call through gRPC, tensors in the messages (else a "
                             "server on this host gets them through a shared-memory mailbox "
                             "and a local socket)")
    worker.add_argument("--poison", type=_poison, default=None,
                        help="injected fault: label_flip | random_labels | scaled_gradient:F")
    _dp_flags(worker)
    _precision_flags(worker)
    _security_flags(worker)
    worker.add_argument("--metrics", type=Path, default=None,
                        help="append one JSON line per step here")
    worker.add_argument("--start-time", type=float, default=None,
                        help="the run's start (Unix time); metrics count from it")
    worker.set_defaults(run=_run_worker)

    status = commands.add_parser("status", help="show a running cluster, live")
    status.add_argument("addresses", nargs="+", help="server addresses HOST:PORT")
    status.add_argument("--once", action="store_true", help="print the table once and exit")
    status.add_argument("--interval", type=_positive_float, default=1.0,
                        help="seconds between refreshes (default: 1)")
    _security_flags(status)
    status.set_defaults(run=_run_status)

    placement = commands.add_parser("placement",
                                    help="print where a model's tensors would go")
    placement.add_argument("--servers", type=_positive_int, default=2,
                           help="servers to place the model on (default: 2)")
    _model_flags(placement)
    _placement_flags(placement)
    placement.set_defaults(run=_run_placement)

    report = commands.add_parser(
        "data-report", help="a data set's quality, and its shards over W workers")
    report.add_argument("dataset", help="digits | synthetic | mnist:DIR | csv:PATH")
    report.add_argument("--workers", type=_positive_int, default=2,
                        help="shards to split the training set into (default: 2)")
    report.add_argument("--partition", choices=("iid", "label_skew"), default="iid",
                        help="how the shards are drawn, as tinyps launch draws them")
    report.add_argument("--alpha", type=_positive_float, default=0.5,
                        help="label_skew's Dirichlet concentration (smaller: more skew)")
    report.add_argument("--seed", type=int, default=0,
                        help="the seed of the split and the partition, as a run's --seed")
    report.add_argument("--min-class-share", type=_positive_float, default=None,
                        help="flag a class below this share (default: half an even share)")
    report.add_argument("--out", type=Path, default=Path("."),
                        help="where data_report.json and .txt go (default: here)")
    report.add_argument("--plot", action="store_true",
                        help="also draw the shards' class histograms (data_report.png)")
    report.set_defaults(run=_run_data_report)

    train = commands.add_parser(
        "train", help="train the MLP in this one process (the baseline for distributed runs)")
    _model_flags(train)
    _training_flags(train, epochs=30, lr=0.05)
    train.add_argument("--augment", action="store_true",
                       help="random one-pixel shifts of image batches")
    train.add_argument("--json", action="store_true",
                       help="print the result as JSON on the last line of standard output")
    train.set_defaults(run=_run_train)
    parser.commands = dict(commands.choices)  # name -> its parser, for docs/cli.md
    return parser


def server_kwargs(args: argparse.Namespace) -> dict:
    """serve(...)'s arguments for a parsed `tinyps server` command line (the Ray backend's
    server actors use it too)."""
    from ps.security import server_tls
    from ps.server import Checkpointing

    if args.restore and args.checkpoint_dir is None:
        raise ValueError("--restore needs --checkpoint-dir (where the checkpoints are)")
    checkpointing = None if args.checkpoint_dir is None else Checkpointing(
        args.checkpoint_dir, args.checkpoint_every, args.keep_checkpoints, args.restore)
    return dict(host=args.host or "127.0.0.1", port=args.port, mode=args.mode,
                workers=args.workers, staleness=args.staleness,
                staleness_lr=args.staleness_lr, max_staleness=args.max_staleness,
                token=args.token, tls=server_tls(args.tls_cert, args.tls_key, args.tls_ca),
                backup_workers=args.backup_workers, aggregate=args.aggregate,
                lease_s=args.lease, checkpointing=checkpointing,
                dp_noise_std=args.dp_noise_std, dp_seed=args.dp_seed)


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The WorkerSettings of a parsed `tinyps worker` command line (the Ray backend's worker
    actors use it too)."""
    from ps.security import client_tls
    from worker.privacy import DPConfig
    from worker.process import WorkerSettings

    return WorkerSettings(
        servers=args.servers, index=args.index, workers=args.workers, dataset=args.dataset,
        hidden=args.hidden, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        placement=args.placement, split_bytes=args.split_bytes, partition=args.partition,
        alpha=args.alpha, slowdown=args.slowdown, seed=args.seed, fused=args.fused,
        shared_memory=args.shared_memory, metrics=args.metrics, start_time=args.start_time,
        precision=args.precision,
        loss_scale=args.loss_scale, init_scale=args.init_scale,
        growth_interval=args.growth_interval, token=args.token, poison=args.poison,
        dp=None if args.dp_noise is None else DPConfig(
            noise=args.dp_noise, clip=args.dp_clip, delta=args.dp_delta,
            noise_at=args.dp_noise_at, seed=args.dp_seed),
        tls=client_tls(args.tls_cert, args.tls_key, args.tls_ca),
    )


# -- the commands -------------------------------------------------------------------------


def _run_launch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tinyps.config import LaunchConfig
    from tinyps.launcher import launch

    config = LaunchConfig(
        servers=args.servers, workers=args.workers, mode=args.mode, staleness=args.staleness,
        staleness_lr=args.staleness_lr, max_staleness=args.max_staleness,
        dataset=args.dataset, hidden=args.hidden, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, placement=args.placement, split_bytes=args.split_bytes,
        partition=args.partition, alpha=args.alpha, slow_worker=args.slow_worker,
        precision=args.precision, loss_scale=args.loss_scale, init_scale=args.init_scale,
        growth_interval=args.growth_interval, seed=args.seed,
        fused=args.fused, shared_memory=args.shared_memory, run_dir=args.run_dir,
        token=args.token,
        tls_cert=_text(args.tls_cert), tls_key=_text(args.tls_key), tls_ca=_text(args.tls_ca),
        backup_workers=args.backup_workers, aggregate=args.aggregate,
        checkpoint_dir=_text(args.checkpoint_dir), checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=_text(args.resume),
        max_restarts=args.max_restarts, lease_s=args.lease, byzantine=args.byzantine,
        kill_server=args.kill_server, kill_worker=args.kill_worker,
        poison_workers=args.poison_workers, poison=args.poison, dp_noise=args.dp_noise,
        dp_clip=args.dp_clip, dp_delta=args.dp_delta, dp_noise_at=args.dp_noise_at,
        dp_target_epsilon=args.dp_target_epsilon, dp_seed=args.dp_seed,
        backend=args.backend, ray_address=args.ray_address,
    )

    def progress(done: int, total: int, losses: dict[int, float], samples_per_s: float) -> None:
        if bar.total != total:
            bar.reset(total=total)
        loss = sum(losses.values()) / len(losses)
        bar.set_postfix_str(f"loss {loss:.4f}, {samples_per_s:,.0f} samples/s", refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()  # training is over; evaluation and the report follow

    from tinyps.launcher import model_placement
    from tinyps.summary import format_summary
    from worker.data import load_dataset

    print(model_placement(config, load_dataset(config.dataset, seed=config.seed)).table(),
          flush=True)
    bar = tqdm(total=None, unit="step", desc=config.mode, file=sys.stderr, dynamic_ncols=True)
    try:
        summary, run_dir = launch(config, progress=progress)
    finally:
        bar.close()
    print(format_summary(summary, run_dir))
    if args.json:
        print(json.dumps(summary))
    return 0


def _from_spec(args: argparse.Namespace, kind: str) -> argparse.Namespace:
    """The arguments a spec gives this process: the launcher's command line for it, parsed
    as if typed. The token stays the one this process was given."""
    from tinyps.spec import ClusterSpec

    if args.index is None:
        raise ValueError("--cluster needs --index (which of the spec's processes this is)")
    spec = ClusterSpec.load(args.cluster)
    if kind == "server":
        argv = spec.server_argv(args.index, host=args.host)
        if args.ready_file is not None:
            argv += ["--ready-file", str(args.ready_file)]
    else:
        if args.run_dir is not None and args.index != 0:
            raise ValueError("--run-dir is for worker 0, which writes the run's summary")
        argv = spec.worker_argv(args.index)
    parsed = build_parser().parse_args(argv)
    parsed.token = args.token
    parsed.spec = spec
    parsed.run_dir = getattr(args, "run_dir", None)
    return parsed


def _run_server(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        return _run_server(_from_spec(args, "server"))
    from ps.memory import keep_freed_buffers
    from ps.server import serve
    from tinyps.processes import die_with_parent

    die_with_parent()
    keep_freed_buffers()
    running = serve(**server_kwargs(args))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    print(f"tinyps server: {args.mode} for {args.workers} workers on {running.address}",
          file=sys.stderr, flush=True)
    if args.ready_file is not None:  # written whole, then renamed: a reader never sees half
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(running.address + "\n")
        tmp.replace(args.ready_file)
    running.wait()
    print("tinyps server: stopped", file=sys.stderr, flush=True)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        return _run_worker(_from_spec(args, "worker"))
    if args.servers is None or args.workers is None:
        raise ValueError("tinyps worker needs --servers and --workers, or --cluster FILE")
    from tinyps.processes import die_with_parent
    from worker.process import run_worker_process

    die_with_parent()
    settings = worker_settings(args)
    records = run_worker_process(settings)
    last = records[-1] if records else None
    print(f"tinyps worker {args.index}: {len(records)} steps"
          + (f", last loss {last.loss:.4f}" if last else ""), file=sys.stderr)
    if getattr(args, "spec", None) is not None and args.run_dir is not None:
        from tinyps.spec import finish_run
        from tinyps.summary import format_summary

        summary = finish_run(args.spec, args.run_dir, [r.as_dict() for r in records],
                             args.token)
        print(format_summary(summary, args.run_dir), flush=True)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from ps.client import PSClient
    from ps.security import client_tls
    from tinyps.status import status_table

    tls = client_tls(args.tls_cert, args.tls_key, args.tls_ca)
    with PSClient(list(args.addresses), token=args.token, tls=tls, deadline_s=5.0,
                  retry_s=2.0) as client:
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


def _run_placement(args: argparse.Namespace) -> int:
    from ps.placement import TensorSpec, place
    from worker.data import load_dataset
    from worker.model import MLP

    data = load_dataset(args.dataset)
    model = MLP((data.n_features, *args.hidden, data.n_classes))
    specs = [TensorSpec(n, s) for n, s in model.param_shapes().items()]
    print(place(specs, args.servers, args.placement, args.split_bytes).table())
    return 0


def _run_data_report(args: argparse.Namespace) -> int:
    from worker.quality import data_report, format_report, save_report

    report = data_report(args.dataset, workers=args.workers, partition=args.partition,
                         alpha=args.alpha, seed=args.seed,
                         min_class_share=args.min_class_share)
    print(format_report(report))
    paths = save_report(report, args.out)
    if args.plot:
        from tinyps.report import plot_shards

        paths.append(plot_shards(report, args.out / "data_report.png"))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.baseline import TrainConfig, train_single_process

    config = TrainConfig(
        dataset=args.dataset, hidden=args.hidden, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, augment=args.augment, seed=args.seed,
    )
    bar = tqdm(total=None, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True)

    def on_step(step: int, total: int, loss: float) -> None:
        if bar.total is None:
            bar.reset(total=total)
        bar.update(1)
        if step % 20 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        result = train_single_process(config, on_step=on_step)
    finally:
        bar.close()
    print(
        f"{config.dataset}: test accuracy {result.test_accuracy:.2%}, test loss "
        f"{result.test_loss:.4f}, {result.steps} steps in {result.wall_s:.1f} s "
        f"({result.samples_per_s:,.0f} samples/s)"
    )
    if args.json:
        print(json.dumps(result.summary()))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that a launcher stops its children on the way out (a
    # server installs its own graceful handler).
    previous = signal.signal(signal.SIGTERM, _interrupt) if args.command != "server" else None
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        # Bad settings, data or address: one clear line, not a traceback.
        print(f"tinyps {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyps {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failed run (a process died, a server refused): no traceback
        from ps.client import PSError
        from tinyps.launcher import LaunchError

        if isinstance(err, LaunchError | PSError):
            print(f"tinyps {args.command}: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
