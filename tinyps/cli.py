"""The `tinyps` command: one sub-command per job, each a thin layer over the library.

The command owns the terminal (progress bars, tables, exit codes); the library never prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyps", description="A parameter-server training system for teaching."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train the MLP in this one process (the baseline for distributed runs)"
    )
    train.add_argument("--dataset", default="digits",
                       help="digits | synthetic | mnist:DIR | csv:PATH (default: digits)")
    train.add_argument("--hidden", type=_int_list, default=(128,),
                       help="hidden layer widths, comma separated (default: 128)")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--lr", type=_positive_float, default=0.05)
    train.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    train.add_argument("--augment", action="store_true",
                       help="random one-pixel shifts of image batches")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--json", action="store_true",
                       help="print the result as JSON on the last line of standard output")
    train.set_defaults(run=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.baseline import TrainConfig, train_single_process

    config = TrainConfig(
        dataset=args.dataset, hidden=args.hidden, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        augment=args.augment, seed=args.seed,
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
    summary = result.summary()
    print(
        f"{config.dataset}: test accuracy {result.test_accuracy:.2%}, test loss "
        f"{result.test_loss:.4f}, {result.steps} steps in {result.wall_s:.1f} s "
        f"({result.samples_per_s:,.0f} samples/s)"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad settings or data: one clear line, not a traceback.
        print(f"tinyps {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyps {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
