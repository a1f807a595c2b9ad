"""Checkpoints: a shard's Snapshot as a file, written atomically, and read back.

Server i of a run keeps its files in root/server{i}; ps/resplit.py assembles a new shard from
the old ones when a run restarts over a different number of servers. No gRPC, no Store: only
files.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.snapshot import KeyState, Snapshot

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_path",
    "latest_checkpoint",
    "latest_set",
    "list_checkpoints",
    "read_checkpoint",
    "server_directory",
    "write_atomically",
    "write_checkpoint",
]

FORMAT_VERSION = 1  # bump when the layout of the file changes; read_checkpoint refuses others

_NAME = re.compile(r"ckpt-(\d+)\.npz")
_SERVER = re.compile(r"server(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of another format, holds a non-finite value, or
    cannot be assembled."""


# ---- one file -----------------------------------------------------------------------------


def _plain_counter(name: str, value: object) -> int | list[int]:
    """A counter as JSON: an int or a list of ints (operator.index refuses floats)."""
    try:
        if isinstance(value, (list, tuple, np.ndarray)):
            return [operator.index(v) for v in value]
        return operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(
            f"counter {name!r}: expected an int or a list of ints, got {value!r}"
        ) from None


def _check_finite(what: str, arr: np.ndarray) -> None:
    """A checkpoint never holds inf or NaN: a store restored from it could not train on, and
    the file would take the place of a good one (see write_checkpoint)."""
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise CheckpointError(f"{what} holds {bad.size} non-finite value(s) (first at element "
                              f"{bad[0]}: {arr.flat[bad[0]]}): a checkpoint never stores inf "
                              f"or NaN")


def _pack(snapshot: Snapshot, round_step: int | None = None,
          final: bool = False) -> dict[str, np.ndarray]:
    """Snapshot -> the arrays of the .npz: "meta" (JSON) and value_i, clocks_i, opt_i_NAME."""
    arrays: dict[str, np.ndarray] = {}
    keys = []
    for i, ks in enumerate(snapshot.keys):
        key = ks.key
        value = np.ascontiguousarray(ks.value, dtype=np.float32)
        clocks = np.ascontiguousarray(ks.clocks, dtype=np.int64)
        if value.shape != (key.size,):
            raise ValueError(f"key {key}: value has shape {value.shape}, expected ({key.size},)")
        if clocks.shape != (snapshot.workers,):
            raise ValueError(
                f"key {key}: clocks have shape {clocks.shape}, expected ({snapshot.workers},)"
            )
        _check_finite(f"key {key}: the value", value)
        arrays[f"value_{i}"] = value
        arrays[f"clocks_{i}"] = clocks
        opt_arrays, opt_ints = [], {}
        for name, state in ks.optimizer.items():
            if isinstance(state, np.ndarray):
                arrays[f"opt_{i}_{name}"] = np.ascontiguousarray(state, dtype=np.float32)
                _check_finite(f"key {key}: optimizer state {name!r}", arrays[f"opt_{i}_{name}"])
                opt_arrays.append(name)
            else:
                opt_ints[name] = operator.index(state)  # adam's "step"
        keys.append({
            "name": key.name, "tensor_shape": list(key.tensor_shape), "start": key.start,
            "stop": key.stop, "version": int(ks.version), "opt_arrays": opt_arrays,
            "opt_ints": opt_ints,
        })
    meta = {
        "format": FORMAT_VERSION,
        "mode": snapshot.mode,
        "workers": snapshot.workers,
        "optimizer": asdict(snapshot.optimizer),
        "seq": snapshot.seq,
        # The run-wide round this file stands for, and whether the server wrote it as it
        # stopped (ps/checkpoint_set.py groups the servers' files by them).
        "round": round_step,
        "final": final,
        "counters": {k: _plain_counter(k, v) for k, v in snapshot.counters.items()},
        "keys": keys,
    }
    # A 0-d unicode array: loads without pickle, unlike a dict or an object array.
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def _array(npz: np.lib.npyio.NpzFile, name: str, dtype: type, shape: tuple[int, ...]):
    """One array of the file, checked for dtype and shape, writable."""
    if name not in npz.files:
        raise CheckpointError(f"array {name!r} is missing")
    arr = npz[name]
    if arr.dtype != dtype or arr.shape != shape:
        raise CheckpointError(
            f"array {name!r} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}"
        )
    return np.require(arr, requirements=["C", "W"])  # copies only if NumPy handed out a view


def _unpack(npz: np.lib.npyio.NpzFile) -> Snapshot:
    if "meta" not in npz.files:
        raise CheckpointError("no 'meta' entry: not a tinyps checkpoint")
    meta = json.loads(str(npz["meta"][()]))
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"format version {meta.get('format')!r}, this tinyps reads {FORMAT_VERSION}"
        )
    workers = int(meta["workers"])
    keys = []
    for i, k in enumerate(meta["keys"]):
        key = Key(k["name"], tuple(k["tensor_shape"]), int(k["start"]), int(k["stop"]))
        optimizer: dict[str, np.ndarray | int] = {
            name: _array(npz, f"opt_{i}_{name}", np.float32, (key.size,))
            for name in k["opt_arrays"]
        }
        optimizer.update({name: int(n) for name, n in k["opt_ints"].items()})
        value = _array(npz, f"value_{i}", np.float32, (key.size,))
        for what, arr in (("the value", value), *(
                (f"optimizer state {n!r}", a) for n, a in optimizer.items()
                if isinstance(a, np.ndarray))):
            _check_finite(f"key {key}: {what}", arr)
        keys.append(KeyState(
            key=key,
            value=value,
            version=int(k["version"]),
            clocks=_array(npz, f"clocks_{i}", np.int64, (workers,)),
            optimizer=optimizer,
        ))
    return Snapshot(
        mode=meta["mode"], workers=workers, optimizer=OptimizerConfig(**meta["optimizer"]),
        keys=keys, counters=meta["counters"], seq=int(meta["seq"]),
    )


def read_checkpoint(path: Path | str) -> Snapshot:
    """The Snapshot in a checkpoint file; CheckpointError names the file if it cannot be read."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _unpack(npz)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    # A truncated zip, a bad CRC (zipfile checks it as an array is read to its end), JSON
    # that is not ours, a missing field: all say the same thing, the file is not usable.
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as err:
        problem = f"unreadable ({type(err).__name__}: {err})"
        raise CheckpointError(f"checkpoint {path}: {problem}") from err


# ---- a directory of them ------------------------------------------------------------------


def _seq_of(path: Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: Path | str) -> list[Path]:
    """The complete checkpoint files in directory, oldest first (by seq); no *.tmp."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(seq, p) for p in directory.iterdir()
             if (seq := _seq_of(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def _fsync_directory(directory: Path) -> None:
    """Make a rename in directory durable: the new entry, not only the file's bytes."""
    if os.name != "posix":  # Windows cannot open a directory; its rename is durable enough
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(directory: Path | str, seq: int) -> Path:
    """The file of the checkpoint at `seq` in directory: ckpt-0000000042.npz."""
    return Path(directory) / f"ckpt-{seq:010d}.npz"


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Give `write` a file whose bytes become `path` only whole: a .tmp beside it, fsynced,
    renamed onto the name, the rename made durable. A crash at any moment leaves the old file
    (or none) and at worst a stale .tmp."""
    # Same directory as the target, so that os.replace is a rename within one file system.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_checkpoint(directory: Path | str, snapshot: Snapshot, keep: int = 3, *,
                     round_step: int | None = None, final: bool = False,
                     protect: Iterable[Path] = ()) -> Path:
    """Write directory/ckpt-{seq:010d}.npz atomically, then keep only the newest `keep`.

    The snapshot is checked first (shapes, and no inf or NaN anywhere: CheckpointError names
    the key): a refused one touches no file, so it never takes a good one's place. The bytes
    go to a .tmp file, are fsynced, and renamed onto the final name: a crash at any moment
    leaves every earlier checkpoint whole, and at worst a stale .tmp that the next write
    deletes. Only then are old files pruned, never one in `protect` (the newest round that
    is complete on every server). `round_step` and `final` go into the file's meta (see
    ps/checkpoint_set.py). One writer per directory (a server writes its own).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if snapshot.seq < 0:  # the file name orders checkpoints by seq: ckpt-0000000042.npz
        raise ValueError(f"snapshot seq must be >= 0, got {snapshot.seq}")
    arrays = _pack(snapshot, round_step, final)  # checks it before any file is touched
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, snapshot.seq)

    write_atomically(path, lambda f: np.savez(f, **arrays))

    # The file just written is never pruned, even if newer seqs exist (say, a corrupt one left
    # by the run this one restarted from): deleting it could leave no readable checkpoint.
    kept = {path, *(Path(p) for p in protect)}
    for old in list_checkpoints(directory)[:-keep]:
        if old not in kept:
            old.unlink(missing_ok=True)
    for stale in directory.glob("ckpt-*.tmp"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: Path | str) -> Snapshot | None:
    """The newest readable checkpoint in directory (skipping corrupt ones), or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path)
        except CheckpointError:
            continue  # a corrupt newest file: the one before it is the state to resume from
    return None


# ---- a run's set of servers ---------------------------------------------------------------


def server_directory(root: Path | str, server: int) -> Path:
    """Where server `server` of the run whose checkpoints live under root keeps its files."""
    return Path(root) / f"server{server}"


def latest_set(root: Path | str) -> list[Snapshot]:
    """The latest checkpoint of every root/server{i}, in order of i (which must be 0..n-1)."""
    root = Path(root)
    found = sorted(
        (int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else [])
        if (m := _SERVER.fullmatch(d.name)) and d.is_dir()
    )
    if not found:
        raise CheckpointError(f"{root}: no server directories (server0, server1, ...)")
    indices = [i for i, _ in found]
    if indices != list(range(len(found))):
        # A missing server would shift every later one to the wrong index.
        raise CheckpointError(f"{root}: server directories are {indices}, expected 0..n-1")
    snapshots = []
    for _, directory in found:
        snapshot = latest_checkpoint(directory)
        if snapshot is None:
            raise CheckpointError(f"{directory}: no readable checkpoint")
        snapshots.append(snapshot)
    return snapshots
