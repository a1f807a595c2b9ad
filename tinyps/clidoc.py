"""docs/cli.md, written from the `tinyps` argument parser itself, so that it cannot drift.

`python -m tinyps.clidoc > docs/cli.md` (or `make docs`) writes it; a test fails when the
committed page differs from what the parser says now.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tinyps.cli import build_parser

__all__ = ["render"]

_WIDTH = "100"  # argparse wraps help to $COLUMNS: fixed, so that the page does not depend on it

_INTRO = """\
# The `tinyps` command

Every command and flag, as `tinyps COMMAND --help` prints them. This page is generated from
the argument parser (`python -m tinyps.clidoc > docs/cli.md`, or `make docs`), and
`tests/test_clidoc.py` fails when it falls behind the code. Every flag that takes a value
checks it before anything starts, and says which flag and why when it refuses one.
"""


@contextmanager
def _columns(width: str):
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def render() -> str:
    """The whole page, as markdown."""
    parser = build_parser()
    with _columns(_WIDTH):
        parts = [_INTRO, "```\n" + parser.format_help().rstrip() + "\n```\n"]
        for name, command in parser.commands.items():
            parts.append(f"## tinyps {name}\n\n```\n{command.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
