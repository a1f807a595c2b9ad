"""Keys: the unit a server versions and updates, and the wire carries.

A key is a flat element range [start, stop) of one tensor. The client cuts each placed part
(a whole tensor or a row range) into keys of at most `chunk_bytes`, so that every message stays
a few MiB: far from gRPC's size limit, and small enough to keep several in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ps.placement import Placement

__all__ = ["DEFAULT_CHUNK_BYTES", "Key", "KeyId", "cut"]

# Measured in benchmarks/bench_transport.py: MiB-sized messages, several in flight, move large
# tensors faster than one huge message.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024

KeyId = tuple[str, int]  # (tensor name, first flat element)


@dataclass(frozen=True)
class Key:
    """Flat elements [start, stop) of the tensor `name`, whose whole shape is tensor_shape."""

    name: str
    tensor_shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def id(self) -> KeyId:
        return (self.name, self.start)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.name}[{self.start}:{self.stop}]"


def cut(placement: Placement, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[int, list[Key]]:
    """Server index -> its keys, each part cut into ranges of at most chunk_bytes (float32)."""
    if chunk_bytes < 4:
        raise ValueError(f"chunk_bytes must hold at least one float32, got {chunk_bytes}")
    per_chunk = chunk_bytes // 4
    keys: dict[int, list[Key]] = {s: [] for s in range(placement.servers)}
    for part in placement.parts:
        start, stop = part.elements
        pieces = max(1, math.ceil((stop - start) / per_chunk))
        for i in range(pieces):
            lo = start + i * per_chunk
            hi = min(stop, lo + per_chunk)
            if hi > lo:
                keys[part.server].append(Key(part.name, part.spec.shape, lo, hi))
    return keys
