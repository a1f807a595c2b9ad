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


def test_abbreviated_flags_are_refused_in_every_command(capsys):
    parser = build_parser()
    for argv in (["launch", "--worker", "2"], ["launch", "--epoch", "1"],
                 ["placement", "--server", "3"], ["train", "--epoch", "1"]):
        try:
            parser.parse_args(argv)
        except SystemExit as exit:
            assert exit.code == 2
        else:
            raise AssertionError(f"{argv} parsed: an abbreviation was accepted")
        assert f"unrecognized arguments: {' '.join(argv[1:])}" in capsys.readouterr().err
    assert parser.parse_args(["launch", "--workers", "2"]).workers == 2  # the full name works
