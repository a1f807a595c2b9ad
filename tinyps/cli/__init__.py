"""The `tinyps` command: one sub-command per job, each a thin layer over the library.

    tinyps launch     a whole cluster on this machine, with a progress bar and a report
    tinyps server     one parameter server          tinyps worker     one worker
    tinyps status     a running cluster, live       tinyps placement  where tensors would go
    tinyps data-report  a data set's quality        tinyps train      the single-process baseline

The flags come from the settings' fields (flags.py), the parser puts them on their commands
(parser.py), and each command is one short function: a cluster process's (process.py), or a
user's tool (cluster.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import signal
import sys
from collections.abc import Sequence

from tinyps.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stacks_on_usr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to standard error and the process goes
    on: how to see where a process that seems stuck is waiting."""
    if not hasattr(signal, "SIGUSR1"):
        return
    # A standard error without a file descriptor (a test's capture) gets no dump.
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that a launcher stops its children on the way out (a
    # server installs its own graceful handler).
    previous = signal.signal(signal.SIGTERM, _interrupt) if args.command != "server" else None
    # A process started in the background of a script inherits SIGINT ignored, and Python
    # then leaves it so: `kill -INT` (what Ctrl-C sends) must still stop it cleanly.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    _stacks_on_usr1()
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        # Bad settings, data or address: one clear line, not a traceback.
        print(f"tinyps {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyps {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # A failed run (a process died, a server refused) is told in one line; anything else
        # is a bug, with its traceback. Imported here: --help and a bad flag load neither.
        from ps.client import PSError
        from tinyps.plan import LaunchError

        if isinstance(err, LaunchError | PSError):
            print(f"tinyps {args.command}: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        # A server that has stopped ignores both until it has exited (process.server): put
        # back, SIGINT pressed again would kill it by its default and turn exit 0 into -2.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)


if __name__ == "__main__":
    sys.exit(main())
