"""A run's checkpoints as rounds: the manifest of the rounds complete on every server, and the
consistent set of files that a resume starts from.

Each server writes its own files (ps/checkpoint.py) and tags each with the round it stands
for; the launcher notes here, now and then, the rounds that every server holds on disk.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ps.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
    server_directory,
    write_atomically,
)
from ps.snapshot import Snapshot

__all__ = ["MANIFEST", "ResumePoint", "Round", "RoundRecorder", "protected_files",
           "read_manifest", "resume_point", "write_manifest"]

MANIFEST = "manifest.json"  # in the run's checkpoint folder, next to server0/, server1/, ...
_FORMAT = 1
_KEEP_ROUNDS = 100  # the manifest lists at most this many rounds, the newest


@dataclass(frozen=True)
class Round:
    """A run-wide step that every server holds: its file (relative to the checkpoint folder)
    and that file's seq (the shard's min version, which may be past `step`) per server."""

    step: int  # a multiple of checkpoint_every; for the final round, the least seq
    files: dict[int, str]
    seqs: dict[int, int]
    final: bool = False  # written as the servers stopped, after the last step

    def label(self) -> str:
        return f"the final round (update {self.step})" if self.final else f"round {self.step}"


# ---- the manifest -------------------------------------------------------------------------


def write_manifest(root: Path | str, servers: int, rounds: list[Round]) -> Path:
    """root/manifest.json, atomically (tmp, fsync, rename, fsync of the folder); OSError if
    the disk refuses, and then the previous manifest is still whole."""
    root = Path(root)
    text = json.dumps({
        "format": _FORMAT, "servers": servers,
        "rounds": [{"step": r.step, "final": r.final,
                    "files": {str(i): {"file": r.files[i], "seq": r.seqs[i]}
                              for i in sorted(r.files)}}
                   for r in rounds[-_KEEP_ROUNDS:]],
    }, indent=1)
    path = root / MANIFEST
    write_atomically(path, lambda f: f.write(text.encode()))
    return path


def read_manifest(root: Path | str) -> list[Round] | None:
    """The rounds listed in root/manifest.json, oldest first; None if there is no manifest;
    CheckpointError naming the file if it cannot be read."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    try:
        if data["format"] != _FORMAT:
            raise CheckpointError(f"{path}: format {data['format']!r}, this tinyps reads "
                                  f"{_FORMAT}")
        servers = int(data["servers"])
        rounds = []
        for r in data["rounds"]:
            files = {int(i): str(f["file"]) for i, f in r["files"].items()}
            if sorted(files) != list(range(servers)):
                raise CheckpointError(f"{path}: round {r['step']} lists servers "
                                      f"{sorted(files)}, expected 0..{servers - 1}")
            rounds.append(Round(int(r["step"]), files,
                                {int(i): int(f["seq"]) for i, f in r["files"].items()},
                                bool(r.get("final", False))))
        return rounds
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a tinyps manifest ({type(err).__name__}: "
                              f"{err})") from err


def protected_files(server_dir: Path | str) -> list[Path]:
    """The files of this server in the newest round its run's manifest lists: pruning keeps
    them, so that a server that writes while another cannot never deletes the last round
    complete on every server. [] if there is no readable manifest (a server of its own)."""
    server_dir = Path(server_dir)
    try:
        rounds = read_manifest(server_dir.parent)
    except CheckpointError:
        return []
    if not rounds:
        return []
    return [server_dir.parent / f for f in rounds[-1].files.values()
            if (server_dir.parent / f).parent == server_dir]


# ---- noting the rounds complete on every server (the launcher does) -----------------------


def _tags(path: Path) -> dict:
    """A checkpoint file's seq, round and final flag, from its meta (not its arrays)."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"][()]))
    return {"seq": int(meta["seq"]), "round": meta.get("round"),
            "final": bool(meta.get("final"))}


@dataclass
class RoundRecorder:
    """Notes in root/manifest.json each round of checkpoints that every one of `servers`
    holds, as it becomes complete. One per run, in the launcher; `record` never raises."""

    root: Path
    servers: int
    every_s: float = 1.0  # record() looks at the files at most this often (but final=True)
    rounds: list[Round] = field(default_factory=list)
    _metas: dict[tuple[str, int, int], dict] = field(default_factory=dict)  # file -> tags
    _next: float = 0.0
    _dirty: bool = True  # rounds not yet in the manifest on disk (at first, an empty one)
    _reported: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        try:
            self.rounds = read_manifest(self.root) or []
        except CheckpointError:
            self.rounds = []  # rewritten from the files at the next complete round

    def _files(self, server: int, seen: dict[tuple[str, int, int], dict]
               ) -> list[tuple[Path, dict]]:
        """This server's checkpoint files with their tags (unreadable ones left out); each
        file (name, mtime, size) is opened once, and `seen` collects what is still there."""
        found = []
        for path in list_checkpoints(server_directory(self.root, server)):
            try:
                st = path.stat()
                key = (str(path), st.st_mtime_ns, st.st_size)
                seen[key] = self._metas[key] if key in self._metas else _tags(path)
                found.append((path, seen[key]))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # being replaced, or damaged: resume reads every file again anyway
        return found

    def _new_rounds(self, files: list[list[tuple[Path, dict]]]) -> list[Round]:
        last = max((r.step for r in self.rounds), default=-1)
        by_round: list[dict[int, tuple[Path, int]]] = []
        for server_files in files:
            mine: dict[int, tuple[Path, int]] = {}
            for path, meta in server_files:  # oldest first: the first of a round is kept
                step = meta.get("round")
                if step is not None and not meta.get("final") and step > last:
                    mine.setdefault(int(step), (path, meta["seq"]))
            by_round.append(mine)
        complete = set.intersection(*(set(m) for m in by_round)) if by_round else set()
        return [self._round(step, [m[step] for m in by_round]) for step in sorted(complete)]

    def _round(self, step: int, picked: list[tuple[Path, int]], final: bool = False) -> Round:
        return Round(step, {i: p.relative_to(self.root).as_posix() for i, (p, _) in
                            enumerate(picked)},
                     {i: seq for i, (_, seq) in enumerate(picked)}, final)

    def _final_round(self, files: list[list[tuple[Path, dict]]]) -> tuple[Round | None, str]:
        """The servers' final checkpoints as one round, or why there is none."""
        picked = []
        for i, server_files in enumerate(files):
            if not server_files or not server_files[-1][1].get("final"):
                newest = server_files[-1][0].name if server_files else "none"
                return None, f"server{i} wrote no final checkpoint (its newest: {newest})"
            path, meta = server_files[-1]
            picked.append((path, meta["seq"]))
        return self._round(min(seq for _, seq in picked), picked, final=True), ""

    def _event(self, text: str) -> list[str]:
        if text in self._reported:
            return []
        self._reported.add(text)
        return [text]

    def look(self, final: bool = False) -> tuple[list[Round], str]:
        """The rounds complete on disk since the last one noted (with final=True, the
        servers' final checkpoints as the last round), and why there is no final round
        ("" if there is one, or final=False). Writes nothing."""
        seen: dict[tuple[str, int, int], dict] = {}
        files = [self._files(i, seen) for i in range(self.servers)]
        self._metas = seen  # pruned files are forgotten
        new = self._new_rounds(files)
        why = ""
        if final:
            last, why = self._final_round(files)
            if last is not None and (not self.rounds or self.rounds[-1].files != last.files):
                new.append(last)
        return new, why

    def record(self, final: bool = False) -> list[str]:
        """Note the rounds complete since the last call (with final=True, after the servers
        stopped, also their final checkpoints as the last round); the fault events to report
        (each once): a manifest that cannot be written, a server without a final checkpoint."""
        now = time.monotonic()
        if not final and now < self._next:
            return []
        self._next = now + self.every_s
        events: list[str] = []
        try:
            new, why = self.look(final)
        except OSError as err:  # a server's folder that cannot be listed
            return self._event(f"checkpoints: cannot read {self.root}: {err}")
        if new:
            self.rounds += new
            self._dirty = True
        if why:
            newest = self.rounds[-1].label() if self.rounds else "nothing (no round is complete)"
            events += self._event(f"checkpoints: {why}; a resume of this run starts from "
                                  f"{newest}")
        if self._dirty and self.root.is_dir():  # no folder yet: no server has written
            try:
                write_manifest(self.root, self.servers, self.rounds)
                self._dirty = False
            except OSError as err:
                events += self._event(f"checkpoints: cannot write {self.root / MANIFEST}: "
                                      f"{err.strerror or err}; a resume takes the rounds it "
                                      f"listed before")
        return events


# ---- resuming from the newest round usable on every server --------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """What a resume starts from: one snapshot per old server, all of one round."""

    snapshots: list[Snapshot]
    step: int  # the round (or, for a run without a manifest, the seq) resumed from
    notes: list[str]  # what a user must hear: each fallback, its file and its reason


def _read_round(root: Path, r: Round) -> tuple[list[Snapshot], list[str]]:
    snapshots, problems = [], []
    for i in sorted(r.files):
        path = root / r.files[i]
        if not path.is_file():
            problems.append(f"{r.files[i]} is missing")
            continue
        try:
            snapshots.append(read_checkpoint(path))
        except CheckpointError as err:
            problems.append(str(err).replace(f"checkpoint {path}", r.files[i], 1))
    return snapshots, problems


def _where(r: Round) -> str:
    return ", ".join(f"server{i} at update {r.seqs[i]}" for i in sorted(r.seqs))


def _from_manifest(root: Path, rounds: list[Round]) -> ResumePoint:
    skipped: list[str] = []
    for r in reversed(rounds):
        snapshots, problems = _read_round(root, r)
        if not problems:
            notes = [f"resume: {s}; resuming from {r.label()} on every server ({_where(r)})"
                     for s in skipped]
            return ResumePoint(snapshots, r.step, notes)
        skipped.append(f"{r.label()} of {root} is not usable ({'; '.join(problems)})")
    raise CheckpointError(f"resume: no round of checkpoints in {root} is usable on every "
                          f"server: " + " | ".join(skipped))


def _server_dirs(root: Path) -> list[Path]:
    found = sorted((int(d.name[6:]), d) for d in (root.iterdir() if root.is_dir() else [])
                   if d.is_dir() and d.name.startswith("server") and d.name[6:].isdigit())
    if not found:
        raise CheckpointError(f"resume: {root} holds no {MANIFEST} and no server "
                              f"directories (server0, server1, ...)")
    if [i for i, _ in found] != list(range(len(found))):
        raise CheckpointError(f"resume: {root}: server directories are "
                              f"{[i for i, _ in found]}, expected 0..n-1")
    return [d for _, d in found]


def _seq(path: Path) -> int:
    return int(path.name[5:15])  # ckpt-0000000042.npz


def _passed_over(root: Path, path: Path) -> str:
    """A newer file than the round resumed from, and why it was not taken."""
    name = path.relative_to(root).as_posix()
    try:
        read_checkpoint(path)
    except CheckpointError as err:
        return str(err).replace(f"checkpoint {path}", name, 1)
    return f"{name} (its round is not on every server)"


def _without_manifest(root: Path) -> ResumePoint:
    """No manifest: a cluster without a launcher (a spec, Kubernetes), a launcher that died
    before its first note, or an older tinyps. The rounds the files' tags make complete on
    every server; files without tags (an older run): the servers' newest readable
    checkpoints, only if they are all of one seq (the same step, in sync)."""
    directories = _server_dirs(root)
    rounds, _ = RoundRecorder(root, len(directories)).look(final=True)
    if rounds:
        point = _from_manifest(root, rounds)
        taken = next(r for r in reversed(rounds) if r.step == point.step)
        newer = [_passed_over(root, path) for i, d in enumerate(directories)
                 for path in list_checkpoints(d) if _seq(path) > taken.seqs[i]]
        if newer:
            point.notes.append(f"resume: {root} has no {MANIFEST}; resuming from "
                               f"{taken.label()}, the newest round readable on every server "
                               f"({_where(taken)}), passing over {'; '.join(newer)}")
        return point
    snapshots, notes, newest = [], [], []
    for directory in directories:
        skipped = []
        for path in reversed(list_checkpoints(directory)):
            try:
                snapshots.append(read_checkpoint(path))
                break
            except CheckpointError as err:
                skipped.append(str(err))
        else:
            raise CheckpointError(f"resume: {directory}: no readable checkpoint"
                                  + (f" ({'; '.join(skipped)})" if skipped else ""))
        newest.append(f"{directory.name}: {snapshots[-1].seq}")
        notes += [f"resume: skipped {s}" for s in skipped]
    seqs = {s.seq for s in snapshots}
    if len(seqs) != 1:
        raise CheckpointError(
            f"resume: {root} has no {MANIFEST}, and no round of checkpoints is complete on "
            f"every server; their newest readable checkpoints are at different updates "
            f"({', '.join(newest)}): resuming would mix two moments of the model")
    if notes:
        notes.append(f"resume: resuming from update {seqs.pop()} on every server "
                     f"(no {MANIFEST}: a run of an older tinyps)")
    return ResumePoint(snapshots, snapshots[0].seq, notes)


def resume_point(root: Path | str) -> ResumePoint:
    """The newest round of root's manifest whose file is readable on every server, with a
    note for each newer round passed over (its file and the reason). CheckpointError, naming
    what is missing, if no round is usable or the manifest is unreadable."""
    root = Path(root)
    try:
        rounds = read_manifest(root)
    except CheckpointError as err:
        raise CheckpointError(f"resume: {err}: cannot tell which checkpoints of the servers "
                              f"belong together (delete it to resume from the servers' newest "
                              f"checkpoints, if they are all of one step)") from None
    if rounds is None:
        return _without_manifest(root)
    if not rounds:
        held = "; ".join(
            f"{d.name}: {', '.join(p.name for p in list_checkpoints(d)) or 'none'}"
            for d in sorted(root.glob("server*")) if d.is_dir())
        raise CheckpointError(f"resume: {root / MANIFEST} lists no round of checkpoints "
                              f"complete on every server (the servers hold: {held or 'none'})")
    return _from_manifest(root, rounds)
