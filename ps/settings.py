"""Settings: each one a dataclass field that carries its own help, in configs that nest.

A setting lives once: its default is the field's, its check is in its class's __post_init__,
its help is in the field's metadata (`setting`). Configs nest (a launch holds the server's,
the worker's, the precision's ...); every setting keeps one name in the whole tree, so a flat
dict (flags, config.json, `tinyps.launch(**kwargs)`) finds its field without a path, and a
child process receives its config whole (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, NamedTuple

__all__ = ["Leaf", "default_of", "from_dict", "from_flat", "leaves", "part", "setting",
           "to_dict", "to_flat"]


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None,
            aliases: tuple[str, ...] = (), metavar: str | None = None,
            choices: tuple[str, ...] | None = None,
            parse: Callable[[str], Any] | None = None, secret: bool = False,
            env: str | None = None) -> Any:
    """A config field: its default, and what its flag needs (help, name, parser, choices).

    flag: the flag's name when it is not --the-field-name; parse: text -> value, raising
    ValueError with a message; secret: never written to a file (config.json, a child's
    settings); env: the environment variable that gives the default.
    """
    meta = {"help": help, "flag": flag, "aliases": aliases, "metavar": metavar,
            "choices": choices, "parse": parse, "secret": secret, "env": env}
    return dataclasses.field(default=default, metadata=meta)


def part(cls: type) -> Any:
    """A config nested in another: its settings are the outer config's too."""
    return dataclasses.field(default_factory=cls, metadata={"part": True})


class Leaf(NamedTuple):
    """One setting of a (nested) config: where it sits and its field."""

    path: tuple[str, ...]  # the parts to walk to its owner ("train",) ...
    field: Field
    hint: Any  # its type, resolved


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _derived(cls: type) -> dict[str, str | None]:
    """Settings of its parts that a config sets itself, as {"part.name": source}: not
    settings of the outer config (no flag, not in its flat dict). A source names the outer
    setting whose value the part takes as it is built (so that the part's own checks see it);
    None: the outer config sets it in its __post_init__."""
    return getattr(cls, "DERIVED", {})


def leaves(cls: type) -> dict[str, Leaf]:
    """Every setting of `cls` and its parts, by name, in field order."""
    hints, derived, out = _hints(cls), _derived(cls), {}
    for f in fields(cls):
        if f.metadata.get("part"):
            for name, leaf in leaves(hints[f.name]).items():
                if f"{f.name}.{name}" not in derived:
                    out[name] = leaf._replace(path=(f.name, *leaf.path))
        else:
            out[f.name] = Leaf((), f, hints[f.name])
    return out


def default_of(leaf: Leaf) -> Any:
    f = leaf.field
    return f.default_factory() if f.default is MISSING else f.default


def _coerce(hint: Any, value: Any) -> Any:
    """A JSON value as the field's type wants it: lists become tuples."""
    if isinstance(value, list) and _wants_tuple(hint):
        return tuple(value)
    return value


def _wants_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    return any(_wants_tuple(h) for h in typing.get_args(hint)
               if typing.get_origin(hint) in (typing.Union, _UnionType))


_UnionType = type(int | None)


def from_flat(cls: type, values: dict[str, Any], *, where: str = "settings") -> Any:
    """A config of `cls` from flat settings by name (the others keep their defaults).

    An unknown name is refused with the names it could have meant.
    """
    known = leaves(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}")
    nested: dict = {}
    for name, value in values.items():
        leaf = known[name]
        slot = nested
        for step in leaf.path:
            slot = slot.setdefault(step, {})
        slot[name] = _coerce(leaf.hint, value)
    for path, source in _derived(cls).items():
        if source is not None:
            where, _, name = path.rpartition(".")
            value = values.get(source, default_of(known[source]))
            nested.setdefault(where, {})[name] = value
    return _build(cls, nested)


def _build(cls: type, nested: dict) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in nested:
            continue
        value = nested[f.name]
        kwargs[f.name] = _build(hints[f.name], value) if f.metadata.get("part") else value
    return cls(**kwargs)


def to_flat(config: Any, *, secrets: bool = False) -> dict[str, Any]:
    """Every setting of a config by name (secret ones as None unless `secrets`)."""
    out = {}
    for name, leaf in leaves(type(config)).items():
        owner = config
        for step in leaf.path:
            owner = getattr(owner, step)
        value = getattr(owner, name)
        out[name] = None if leaf.field.metadata.get("secret") and not secrets else value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """The whole config, nested as it is, for a child process (secret settings left out:
    they travel in the environment)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("part"):
            out[f.name] = to_dict(value)
        elif not f.metadata.get("secret"):
            out[f.name] = value
    return out


def from_dict(cls: type, data: dict[str, Any], **secrets: Any) -> Any:
    """The inverse of to_dict; `secrets` (such as token=...) are set wherever they belong."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {unknown}")
    kwargs = {}
    for name, f in names.items():
        if f.metadata.get("part"):
            kwargs[name] = from_dict(hints[name], data.get(name, {}), **secrets)
        elif f.metadata.get("secret"):
            if name in secrets:
                kwargs[name] = secrets[name]
        elif name in data:
            kwargs[name] = _coerce(hints[name], data[name])
    return cls(**kwargs)
