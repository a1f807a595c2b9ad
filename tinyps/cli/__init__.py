"""The `tinyps` command: one sub-command per job, each a thin layer over the library.

    tinyps launch     a whole cluster on this machine, with a progress bar and a report
    tinyps server     one parameter server          tinyps worker     one worker
    tinyps status     a running cluster, live       tinyps placement  where tensors would go
    tinyps data-report  a data set's quality        tinyps train      the single-process baseline

The flags come from the settings' fields (flags.py), the parser puts them on their commands
(parser.py), and each command is one short function (commands.py).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from ps.client import PSError
from tinyps.cli.parser import build_parser
from tinyps.launcher import LaunchError

__all__ = ["build_parser", "main"]


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
    except (LaunchError, PSError) as err:  # a failed run: a process died, a server refused
        print(f"tinyps {args.command}: {err}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
