"""docs/cli.md is what the argument parser says now: regenerate it with `make docs`."""

from pathlib import Path

from tinyps.cli import build_parser
from tinyps.clidoc import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_docs_cli_md_matches_the_parser():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_and_flag_is_documented():
    text = DOC.read_text()
    parser = build_parser()
    for name, command in parser.commands.items():
        assert f"## tinyps {name}" in text
        for action in command._actions:  # argparse keeps them here; read-only use
            for flag in action.option_strings:
                assert flag in text, f"{name} {flag} missing from docs/cli.md"
            if action.option_strings and action.dest != "help":
                assert action.help, f"tinyps {name} {action.option_strings[0]} has no help"
