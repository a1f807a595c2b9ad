"""Flags made from the settings' fields: a flag, its default and its help live in the field.

`add_settings(parser, LaunchConfig)` adds one flag per setting (`--batch-size` for
`batch_size`, `--no-fused` for a setting that is on by default); `settings_from(args, ...)`
gives back the settings typed on the command line, by name, and the config's own
constructor checks them, so that nothing is checked twice.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Callable, Iterable
from typing import Any

from ps.settings import Leaf, default_of, leaves

__all__ = ["add_settings", "settings_from"]

_UNION = type(int | None)


def _plain(hint: Any) -> Any:
    """The type of a setting, without its `| None`."""
    if typing.get_origin(hint) in (typing.Union, _UNION):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _number(kind: type, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and value != value:  # NaN passes float() but no check after it
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A setting's own parser, its ValueError shown as argparse shows a bad value."""
    def run(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    run.__name__ = getattr(parse, "__name__", "value")
    return run


def _converter(leaf: Leaf) -> Callable[[str], Any]:
    parse = leaf.field.metadata.get("parse")
    if parse is not None:
        return _checked(parse)
    kind = _plain(leaf.hint)
    if kind is int:
        return _number(int, "an integer")
    if kind is float:
        return _number(float, "a number")
    return str


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_settings(parser: argparse.ArgumentParser, config: type, *,
                 only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
    """One flag per setting of `config` (or those named in `only`), in field order.

    Flags default to "not given" (argparse.SUPPRESS): the config's defaults are the only ones.
    """
    chosen = leaves(config)
    if only is not None:
        only = list(only)
        chosen = {name: chosen[name] for name in only}
    for name, leaf in chosen.items():
        if name in skip:
            continue
        meta = leaf.field.metadata
        default = default_of(leaf)
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        text = meta.get("help") or ""
        if meta.get("env"):
            text += f" (default: ${meta['env']})"
        elif default not in (None, ()) and _plain(leaf.hint) is not bool:
            text += f" (default: {_shown(default)})"
        if _plain(leaf.hint) is bool:
            if default:  # on unless turned off
                parser.add_argument("--no-" + flag[2:], dest=name, action="store_false",
                                    default=argparse.SUPPRESS, help=text)
            else:
                parser.add_argument(flag, *meta.get("aliases", ()), dest=name,
                                    action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        parser.add_argument(flag, *meta.get("aliases", ()), dest=name, type=_converter(leaf),
                            choices=meta.get("choices"), metavar=meta.get("metavar"),
                            default=argparse.SUPPRESS, help=text)


def settings_from(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The settings of `config` given on the command line (or by its environment variable),
    by name: what `from_flat(config, ...)` takes."""
    given = {}
    for name, leaf in leaves(config).items():
        if hasattr(args, name):
            given[name] = getattr(args, name)
        elif (env := leaf.field.metadata.get("env")) and os.environ.get(env):
            given[name] = os.environ[env]
    return given
