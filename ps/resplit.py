"""Re-placing a model over another number of servers: the old shards' checkpoints assembled
into the new layout's, element for element, when a run resumes with more or fewer servers.
Only Snapshots in and out: the files are ps/checkpoint.py's.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import pairwise

import numpy as np

from ps.checkpoint import CheckpointError
from ps.keys import Key
from ps.snapshot import KeyState, Snapshot

__all__ = ["resplit"]


def _is_histogram(value: object) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _sum_counters(snapshots: list[Snapshot]) -> dict[str, int | list[int]]:
    """Totals of the run: ints add up, histograms (lists) add up bin by bin."""
    total: dict[str, int | list[int]] = {}
    for snapshot in snapshots:
        for name, value in snapshot.counters.items():
            have = total.get(name)
            if have is not None and _is_histogram(have) != _is_histogram(value):
                raise CheckpointError(f"counter {name!r} is a list in one snapshot, not in another")
            if _is_histogram(value):
                bins = [int(v) for v in value]  # type: ignore[union-attr]
                have = have or []
                longer, shorter = (have, bins) if len(have) >= len(bins) else (bins, have)
                total[name] = [a + (shorter[j] if j < len(shorter) else 0)
                               for j, a in enumerate(longer)]  # type: ignore[arg-type]
            else:
                total[name] = (have or 0) + int(value)  # type: ignore[operator, arg-type]
    return total


def _by_tensor(snapshots: list[Snapshot]) -> dict[str, list[KeyState]]:
    """Tensor name -> its old keys, sorted by start, checked to agree on shape and not overlap."""
    by_name: dict[str, list[KeyState]] = {}
    for snapshot in snapshots:
        for ks in snapshot.keys:
            by_name.setdefault(ks.key.name, []).append(ks)
    for name, states in by_name.items():
        states.sort(key=lambda ks: ks.key.start)
        for a, b in pairwise(states):
            if b.key.tensor_shape != a.key.tensor_shape:
                raise CheckpointError(
                    f"tensor {name!r}: old keys {a.key} and {b.key} disagree on its shape "
                    f"({a.key.tensor_shape} vs {b.key.tensor_shape})"
                )
            if b.key.start < a.key.stop:
                raise CheckpointError(f"tensor {name!r}: old keys {a.key} and {b.key} overlap")
    return by_name


def _overlapping(key: Key, old: list[KeyState], starts: list[int]) -> list[KeyState]:
    """The old keys (sorted by start, disjoint) that hold some element of key."""
    found = []
    for ks in old[max(0, bisect_right(starts, key.start) - 1):]:
        if ks.key.start >= key.stop:
            break
        if ks.key.stop > key.start:
            found.append(ks)
    return found


def _assemble(key: Key, overlapping: list[KeyState], workers: int) -> KeyState:
    """One new key from the old keys that overlap it (sorted by start), copying slices."""
    if not overlapping:
        raise CheckpointError(
            f"tensor {key.name!r}: elements [{key.start}:{key.stop}] are in no old snapshot"
        )
    proto = overlapping[0].optimizer
    names = [n for n, s in proto.items() if isinstance(s, np.ndarray)]
    ints = [n for n, s in proto.items() if not isinstance(s, np.ndarray)]
    value = np.empty(key.size, np.float32)
    optimizer: dict[str, np.ndarray | int] = {n: np.empty(key.size, np.float32) for n in names}
    clocks = np.full(workers, np.iinfo(np.int64).max, np.int64)
    done = key.start  # elements [key.start, done) are filled
    for ks in overlapping:
        if ks.key.start > done:
            raise CheckpointError(
                f"tensor {key.name!r}: elements [{done}:{ks.key.start}] are in no old snapshot "
                f"(needed by the new key {key})"
            )
        if set(ks.optimizer) != set(proto):
            raise CheckpointError(
                f"tensor {key.name!r}: old keys {overlapping[0].key} and {ks.key} hold "
                f"different optimizer state ({sorted(proto)} vs {sorted(ks.optimizer)})"
            )
        lo, hi = max(ks.key.start, key.start), min(ks.key.stop, key.stop)
        dst = slice(lo - key.start, hi - key.start)
        src = slice(lo - ks.key.start, hi - ks.key.start)
        value[dst] = ks.value[src]
        for n in names:
            optimizer[n][dst] = ks.optimizer[n][src]  # type: ignore[index]
        np.minimum(clocks, ks.clocks, out=clocks)
        done = hi
    if done < key.stop:
        raise CheckpointError(
            f"tensor {key.name!r}: elements [{done}:{key.stop}] are in no old snapshot "
            f"(needed by the new key {key})"
        )
    for n in ints:  # adam's step: the least-advanced part of the key decides
        optimizer[n] = min(int(ks.optimizer[n]) for ks in overlapping)  # type: ignore[arg-type]
    return KeyState(
        key=key, value=value, version=min(ks.version for ks in overlapping), clocks=clocks,
        optimizer=optimizer,
    )


def resplit(snapshots: list[Snapshot], layout: list[Key], seq: int | None = None) -> Snapshot:
    """The shard holding `layout`, assembled from all old shards of a run (any key ranges).

    Values and optimizer arrays are copied element for element; a new key's version, clocks and
    Adam step are the minimum over the old keys it overlaps, so that no part of it claims more
    progress than it has. Counters are summed over the old shards; seq defaults to the minimum
    new version. CheckpointError if an element is not covered, a tensor's shape changed, or the
    old shards disagree on mode, workers or optimizer.
    """
    if not layout:
        raise ValueError("resplit needs a non-empty layout")
    if not snapshots:
        raise ValueError("resplit needs at least one old snapshot")
    for key in layout:
        if key.size <= 0:
            raise ValueError(f"layout key {key} holds no element")
    first = snapshots[0]
    for i, snapshot in enumerate(snapshots[1:], start=1):
        for attr in ("mode", "workers", "optimizer"):
            if getattr(snapshot, attr) != getattr(first, attr):
                raise CheckpointError(
                    f"old snapshots disagree on {attr}: {getattr(first, attr)!r} in the "
                    f"first, {getattr(snapshot, attr)!r} in snapshot {i}"
                )

    by_name = _by_tensor(snapshots)
    starts = {name: [ks.key.start for ks in states] for name, states in by_name.items()}
    keys = []
    for key in layout:
        old = by_name.get(key.name, [])
        if old and old[0].key.tensor_shape != key.tensor_shape:
            raise CheckpointError(
                f"tensor {key.name!r}: shape {old[0].key.tensor_shape} in the checkpoint, "
                f"{key.tensor_shape} in the new layout (the model changed)"
            )
        keys.append(_assemble(key, _overlapping(key, old, starts.get(key.name, [])),
                              first.workers))
    return Snapshot(
        mode=first.mode, workers=first.workers, optimizer=first.optimizer, keys=keys,
        counters=_sum_counters(snapshots),
        seq=min(ks.version for ks in keys) if seq is None else seq,
    )
