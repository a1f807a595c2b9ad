"""Placement: which server holds each tensor or row range of a tensor.

A pure function of (tensor specs, server count, strategy); no I/O, no gRPC. The same inputs
always give the same placement, so every worker and server can compute it independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ps.settings import setting

__all__ = ["STRATEGIES", "Part", "Placement", "PlacementConfig", "TensorSpec", "place"]

STRATEGIES = ("round_robin", "size_balanced")  # or an explicit "dense0=1,dense1=0"

_ITEMSIZE = {"float32": 4}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor as placement sees it: a name, a shape, a dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a tensor needs a name")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"tensor {self.name!r}: dtype must be float32, got {self.dtype!r}")
        if any(int(d) < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in shape {self.shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def layer(self) -> str:
        """The layer a tensor belongs to: the part of its name before the first dot."""
        return self.name.split(".", 1)[0]

    @property
    def rows(self) -> int:
        """Length of the first axis, the axis a split cuts (a scalar is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_size(self) -> int:
        """Elements in one row."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of a tensor, held by one server (a whole tensor is one part)."""

    spec: TensorSpec
    server: int
    rows: tuple[int, int]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def elements(self) -> tuple[int, int]:
        """The part as a range of the tensor's flattened (C-order) elements."""
        return self.rows[0] * self.spec.row_size, self.rows[1] * self.spec.row_size

    @property
    def nbytes(self) -> int:
        start, stop = self.elements
        return (stop - start) * _ITEMSIZE[self.spec.dtype]

    @property
    def is_whole(self) -> bool:
        return self.rows == (0, self.spec.rows)


@dataclass(frozen=True)
class Placement:
    servers: int
    strategy: str
    parts: tuple[Part, ...]

    def parts_on(self, server: int) -> list[Part]:
        return [p for p in self.parts if p.server == server]

    def parts_of(self, name: str) -> list[Part]:
        return [p for p in self.parts if p.name == name]

    def bytes_per_server(self) -> list[int]:
        load = [0] * self.servers
        for p in self.parts:
            load[p.server] += p.nbytes
        return load

    def as_summary(self) -> dict[str, int | list[dict]]:
        """Tensor name -> server index, or [{server, rows: [start, stop]}] for a split tensor."""
        out: dict[str, int | list[dict]] = {}
        for p in self.parts:
            if p.is_whole:
                out[p.name] = p.server
            else:
                entry = {"server": p.server, "rows": list(p.rows)}
                out.setdefault(p.name, []).append(entry)  # type: ignore[union-attr]
        return out

    def table(self) -> str:
        """A plain-text table: tensor, shape, bytes, server (and rows for a split tensor)."""
        header = ("tensor", "shape", "bytes", "server", "rows")
        rows = [header]
        for p in self.parts:
            rows.append((
                p.name, "x".join(map(str, p.spec.shape)) or "()", f"{p.nbytes:,}", str(p.server),
                "all" if p.is_whole else f"{p.rows[0]}:{p.rows[1]}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        loads = self.bytes_per_server()
        per_server = ", ".join(f"server {i}: {b:,} B" for i, b in enumerate(loads))
        lines.append(f"strategy {self.strategy}; {per_server}")
        return "\n".join(lines)


def _parse_explicit(strategy: str, specs: Sequence[TensorSpec], servers: int) -> dict[str, int]:
    """'dense0=1,dense1=0' -> {layer: server}, checked against the model and the server count."""
    layers = {s.layer for s in specs}
    mapping: dict[str, int] = {}
    for item in strategy.split(","):
        layer, sep, index = item.strip().partition("=")
        if not sep or not layer or not index.strip().lstrip("-").isdigit():
            raise ValueError(f"placement {strategy!r}: expected LAYER=SERVER, got {item!r}")
        server = int(index)
        if layer not in layers:
            raise ValueError(
                f"placement {strategy!r}: unknown layer {layer!r} (the model has "
                f"{', '.join(sorted(layers))})"
            )
        if not 0 <= server < servers:
            raise ValueError(
                f"placement {strategy!r}: server {server} for {layer!r} is out of range "
                f"(servers are 0..{servers - 1})"
            )
        if layer in mapping:
            raise ValueError(f"placement {strategy!r}: layer {layer!r} is given twice")
        mapping[layer] = server
    missing = sorted(layers - set(mapping))
    if missing:
        raise ValueError(f"placement {strategy!r}: no server given for {', '.join(missing)}")
    return mapping


def _split(spec: TensorSpec, servers: int) -> list[Part]:
    """Near-equal row ranges of one tensor, one per server (fewer if it has fewer rows)."""
    bounds = np.linspace(0, spec.rows, min(servers, spec.rows) + 1).round().astype(int)
    return [Part(spec, i, (int(bounds[i]), int(bounds[i + 1]))) for i in range(len(bounds) - 1)]


def place(
    specs: Sequence[TensorSpec],
    servers: int,
    strategy: str = "round_robin",
    split_bytes: int | None = None,
) -> Placement:
    """Place every tensor on a server.

    strategy: "round_robin" (tensors in order, to server 0, 1, ..., S-1, 0, ...),
    "size_balanced" (greedy: the largest tensor first, each to the least-loaded server, ties to
    the lower index), or explicit per layer, "dense0=1,dense1=0" (every layer named once).
    split_bytes: any tensor larger than this is cut into near-equal row ranges across all
    servers, whatever the strategy; the strategy places the rest around that load.
    """
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names must be unique, got {names}")
    if split_bytes is not None and split_bytes < 1:
        raise ValueError(f"split_bytes must be >= 1, got {split_bytes}")
    explicit = None if strategy in STRATEGIES else _parse_explicit(strategy, specs, servers)

    parts: dict[str, list[Part]] = {}
    load = [0] * servers
    for spec in specs:
        if split_bytes is not None and spec.nbytes > split_bytes and servers > 1:
            parts[spec.name] = _split(spec, servers)
            for p in parts[spec.name]:
                load[p.server] += p.nbytes
    whole = [s for s in specs if s.name not in parts]

    if explicit is not None:
        for spec in whole:
            parts[spec.name] = [Part(spec, explicit[spec.layer], (0, spec.rows))]
    elif strategy == "round_robin":
        for i, spec in enumerate(whole):
            parts[spec.name] = [Part(spec, i % servers, (0, spec.rows))]
    else:  # size_balanced; a stable sort keeps equal-sized tensors in model order
        for spec in sorted(whole, key=lambda s: -s.nbytes):
            server = min(range(servers), key=lambda i: load[i])
            load[server] += spec.nbytes
            parts[spec.name] = [Part(spec, server, (0, spec.rows))]
    ordered = tuple(p for spec in specs for p in parts[spec.name])
    return Placement(servers, strategy, ordered)


@dataclass(frozen=True)
class PlacementConfig:
    """Which placement a run asks for (checked against its model by `place`)."""

    placement: str = setting(
        "size_balanced", "round_robin | size_balanced | per layer, e.g. dense0=1,dense1=0")
    split_bytes: int | None = setting(
        None, "split tensors larger than this many bytes into row ranges across servers")

    def __post_init__(self) -> None:
        if self.split_bytes is not None and self.split_bytes < 1:
            raise ValueError(f"split_bytes must be >= 1, got {self.split_bytes}")
        if not self.placement:
            raise ValueError("placement must not be empty")

    def place(self, specs: Sequence[TensorSpec], servers: int) -> Placement:
        return place(specs, servers, self.placement, self.split_bytes)
