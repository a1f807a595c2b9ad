"""A resume never mixes steps: the run's manifest lists the rounds of checkpoints complete on
every server, and a resume takes the newest one readable on all of them, says which newer
ones it passed over and why, or refuses, naming what is missing."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import ps.checkpoint_set as cset
from ps.checkpoint import CheckpointError, list_checkpoints, server_directory, write_checkpoint
from ps.checkpoint_set import MANIFEST, RoundRecorder, protected_files, read_manifest
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.snapshot import KeyState, Snapshot
from tinyps.config import LaunchConfig
from tinyps.plan import read_resume_point, read_resumed

EVERY = 20
ROUNDS = (240, 260, 280)  # the issue's: the newest damaged on one server, 260 on both


def _snapshot(seq: int, server: int) -> Snapshot:
    """Server `server`'s shard at update `seq`: one key, every value equal to seq."""
    key = Key(f"dense{server}.weight", (2, 3), 0, 6)
    state = KeyState(key, np.full(6, seq, np.float32), seq, np.full(2, seq, np.int64),
                     {"buf": np.full(6, -seq, np.float32)})
    return Snapshot("sync", 2, OptimizerConfig("momentum"), [state], {"updates": seq}, seq=seq)


def _write(root: Path, server: int, seq: int, final: bool = False, tagged: bool = True,
           **kwargs) -> Path:
    """Server `server`'s checkpoint at `seq`; untagged: as an older tinyps wrote them."""
    return write_checkpoint(server_directory(root, server), _snapshot(seq, server), keep=10,
                            round_step=seq // EVERY * EVERY if tagged else None, final=final,
                            **kwargs)


def _run(root: Path, rounds=ROUNDS, servers: int = 2, record: bool = True,
         tagged: bool = True) -> Path:
    for seq in rounds:
        for server in range(servers):
            _write(root, server, seq, tagged=tagged)
    if record:
        assert RoundRecorder(root, servers, every_s=0).record() == []
    return root


def _config(root: Path) -> LaunchConfig:
    return LaunchConfig.from_flat({"servers": 2, "workers": 2, "mode": "sync",
                                   "resume": str(root)})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _inf(path: Path) -> None:
    """The file as an older tinyps could have written it, with inf in its values."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["value_0"] = arrays["value_0"].copy()
    arrays["value_0"][2] = np.inf
    with open(path, "wb") as f:
        np.savez(f, **arrays)


DAMAGE = {"truncated": (_truncate, "unreadable"), "flipped": (_flip_a_byte, "CRC"),
          "emptied": (lambda p: p.write_bytes(b""), "unreadable"),
          "inf": (_inf, "non-finite"), "deleted": (Path.unlink, "is missing")}


# ---- the case and its class -------------------------------------------------------


@pytest.mark.parametrize("server", [0, 1])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_file_on_one_server_resumes_both_from_the_older_round(
        tmp_path, server, damage):
    root = _run(tmp_path / "run" / "checkpoints")
    hurt, problem = DAMAGE[damage]
    name = f"server{server}/ckpt-0000000280.npz"
    hurt(root / name)
    point = read_resume_point(_config(tmp_path / "run"))
    assert [s.seq for s in point.snapshots] == [260, 260]  # one moment, on both
    assert point.step == 260
    [note] = point.notes
    assert note.startswith(f"resume: round 280 of {root} is not usable ({name}")
    assert problem in note
    assert note.endswith("resuming from round 260 on every server "
                         "(server0 at update 260, server1 at update 260)")
    assert [s.seq for s in read_resumed(_config(tmp_path / "run"))] == [260, 260]


def test_two_damaged_rounds_fall_back_two_rounds_and_say_both(tmp_path):
    root = _run(tmp_path)
    _truncate(root / "server1/ckpt-0000000280.npz")
    (root / "server0/ckpt-0000000260.npz").unlink()
    point = cset.resume_point(root)
    assert [s.seq for s in point.snapshots] == [240, 240]
    assert len(point.notes) == 2
    assert "round 280" in point.notes[0] and "server1/ckpt-0000000280.npz" in point.notes[0]
    assert "round 260" in point.notes[1] and "server0/ckpt-0000000260.npz is missing" in \
        point.notes[1]
    assert all(n.endswith("(server0 at update 240, server1 at update 240)")
               for n in point.notes)


def test_the_newest_round_when_every_file_is_whole_and_no_note(tmp_path):
    point = cset.resume_point(_run(tmp_path))
    assert [s.seq for s in point.snapshots] == [280, 280] and point.notes == []
    np.testing.assert_array_equal(point.snapshots[1].keys[0].value, np.full(6, 280))


def test_no_usable_round_is_refused_naming_every_file(tmp_path):
    root = _run(tmp_path, rounds=(260, 280))
    _truncate(root / "server0/ckpt-0000000280.npz")
    (root / "server1/ckpt-0000000260.npz").unlink()
    with pytest.raises(CheckpointError) as err:
        cset.resume_point(root)
    message = str(err.value)
    assert message.startswith(f"resume: no round of checkpoints in {root} is usable on every "
                              f"server: round 280 of {root} is not usable (server0/ckpt-")
    assert "server1/ckpt-0000000260.npz is missing" in message


# ---- rounds that are not complete ---------------------------------------------------------


def test_a_round_is_listed_once_every_server_holds_it(tmp_path):
    _run(tmp_path, rounds=(240, 260))
    recorder = RoundRecorder(tmp_path, 2, every_s=0)
    _write(tmp_path, 0, 280)  # server1 has not written round 280 (yet, or its disk is full)
    assert recorder.record() == []
    assert [r.step for r in read_manifest(tmp_path)] == [240, 260]
    assert cset.resume_point(tmp_path).step == 260
    _write(tmp_path, 1, 281)  # late for the multiple: 281 is still round 280
    assert recorder.record() == []
    [r240, r260, r280] = read_manifest(tmp_path)
    assert r280.seqs == {0: 280, 1: 281}  # the round, and where each server was
    _write(tmp_path, 0, 300)
    assert recorder.record() == [] and len(read_manifest(tmp_path)) == 3


def test_no_round_complete_on_every_server_is_refused_naming_what_each_holds(tmp_path):
    for seq in (260, 280):
        _write(tmp_path, 0, seq)
    _write(tmp_path, 1, 240)
    assert RoundRecorder(tmp_path, 2, every_s=0).record() == []
    assert read_manifest(tmp_path) == []  # written, and empty
    with pytest.raises(CheckpointError, match=(
            r"lists no round of checkpoints complete on every server \(the servers hold: "
            r"server0: ckpt-0000000260.npz, ckpt-0000000280.npz; server1: ckpt-0000000240.npz")):
        read_resume_point(_config(tmp_path))


# ---- the manifest itself ------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ('{"format": 1, "servers": 2, "rounds": [{"st', r"unreadable \(JSONDecodeError"),
    ("", r"unreadable \(JSONDecodeError"),
    ('{"format": 7, "servers": 2, "rounds": []}', "format 7, this tinyps reads 1"),
    ('{"format": 1, "servers": 2}', r"not a tinyps manifest \(KeyError"),
    ('[1, 2]', r"not a tinyps manifest \(TypeError"),
    ('{"format": 1, "servers": 2, "rounds": [{"step": 5, "files": {"0": {"file": "a", '
     '"seq": 5}}}]}', r"round 5 lists servers \[0\], expected 0..1"),
])
def test_a_corrupt_manifest_is_refused_naming_it(tmp_path, text, problem):
    root = _run(tmp_path / "checkpoints")
    (root / MANIFEST).write_text(text)
    with pytest.raises(CheckpointError) as err:
        read_resume_point(_config(tmp_path))
    message = str(err.value)
    assert message.startswith(f"resume: {root / MANIFEST}: ")
    assert re.search(problem, message), message
    assert "cannot tell which checkpoints of the servers belong together" in message


def test_the_manifest_is_replaced_atomically_and_lists_relative_files(tmp_path):
    root = _run(tmp_path)
    data = json.loads((root / MANIFEST).read_text())
    assert data["servers"] == 2
    assert data["rounds"][-1] == {"step": 280, "final": False, "files": {
        "0": {"file": "server0/ckpt-0000000280.npz", "seq": 280},
        "1": {"file": "server1/ckpt-0000000280.npz", "seq": 280}}}
    assert [p.name for p in root.iterdir() if p.is_file()] == [MANIFEST]  # no .tmp


def test_a_manifest_that_cannot_be_written_is_reported_once_and_written_later(
        tmp_path, monkeypatch):
    _run(tmp_path, rounds=(240,))
    recorder = RoundRecorder(tmp_path, 2, every_s=0)
    write = cset.write_manifest

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cset, "write_manifest", full_disk)
    _run(tmp_path, rounds=(260,), record=False)
    event = (f"checkpoints: cannot write {tmp_path / MANIFEST}: No space left on device; a "
             f"resume takes the rounds it listed before")
    assert recorder.record() == [event]
    assert recorder.record() == []  # once
    assert [r.step for r in read_manifest(tmp_path)] == [240]
    monkeypatch.setattr(cset, "write_manifest", write)
    assert recorder.record() == []
    assert [r.step for r in read_manifest(tmp_path)] == [240, 260]


def test_the_recorder_looks_at_most_once_per_interval(tmp_path):
    recorder = RoundRecorder(_run(tmp_path, rounds=(240,)), 2, every_s=3600)
    assert recorder.record() == []
    _run(tmp_path, rounds=(260,), record=False)
    assert recorder.record() == [] and [r.step for r in read_manifest(tmp_path)] == [240]
    recorder.record(final=True)  # the final call always looks
    assert [r.step for r in read_manifest(tmp_path)] == [240, 260]


def test_the_recorder_opens_each_file_once_and_forgets_pruned_ones(tmp_path, monkeypatch):
    _run(tmp_path, record=False)
    opened = []
    tags = cset._tags
    monkeypatch.setattr(cset, "_tags", lambda path: opened.append(path.name) or tags(path))
    recorder = RoundRecorder(tmp_path, 2, every_s=0)
    recorder.record()
    assert len(opened) == 6
    recorder.record()
    assert len(opened) == 6
    (tmp_path / "server0/ckpt-0000000240.npz").unlink()
    _write(tmp_path, 1, 300)
    recorder.record()
    assert opened[6:] == ["ckpt-0000000300.npz"] and len(recorder._metas) == 6


# ---- the final round ----------------------------------------------------------------------


def test_the_servers_final_checkpoints_are_the_last_round(tmp_path):
    _run(tmp_path)
    recorder = RoundRecorder(tmp_path, 2, every_s=0)
    _write(tmp_path, 0, 293, final=True)  # async: the servers stop at different versions
    _write(tmp_path, 1, 297, final=True)
    assert recorder.record() == []  # the finals are no periodic round (293 is in round 280)
    assert read_manifest(tmp_path)[-1].step == 280
    assert recorder.record(final=True) == []
    last = read_manifest(tmp_path)[-1]
    assert (last.final, last.step, last.seqs) == (True, 293, {0: 293, 1: 297})
    point = cset.resume_point(tmp_path)
    assert [s.seq for s in point.snapshots] == [293, 297] and point.notes == []
    _truncate(tmp_path / "server1/ckpt-0000000297.npz")
    note = cset.resume_point(tmp_path).notes[0]
    assert note.startswith(f"resume: the final round (update 293) of {tmp_path} is not usable")
    assert note.endswith("resuming from round 280 on every server (server0 at update 280, "
                         "server1 at update 280)")


def test_a_server_without_a_final_checkpoint_is_reported(tmp_path):
    _run(tmp_path)
    _write(tmp_path, 0, 293, final=True)  # server1's final write failed
    recorder = RoundRecorder(tmp_path, 2, every_s=0)
    events = recorder.record(final=True)
    assert events == ["checkpoints: server1 wrote no final checkpoint (its newest: "
                      "ckpt-0000000280.npz); a resume of this run starts from round 280"]
    assert not read_manifest(tmp_path)[-1].final
    assert cset.resume_point(tmp_path).step == 280


# ---- pruning never takes the newest complete round ----------------------------------------


def test_a_server_running_ahead_keeps_the_newest_complete_round(tmp_path):
    _run(tmp_path, rounds=(240,))
    for seq in range(260, 400, EVERY):  # server1 cannot write meanwhile (say, a full disk)
        directory = server_directory(tmp_path, 0)
        write_checkpoint(directory, _snapshot(seq, 0), keep=2, round_step=seq,
                         protect=protected_files(directory))
    assert [p.name for p in list_checkpoints(server_directory(tmp_path, 0))] == [
        "ckpt-0000000240.npz", "ckpt-0000000360.npz", "ckpt-0000000380.npz"]
    assert [s.seq for s in cset.resume_point(tmp_path).snapshots] == [240, 240]


def test_protected_files_of_a_server_without_a_manifest_are_none(tmp_path):
    assert protected_files(tmp_path / "server0") == []
    (tmp_path / MANIFEST).write_text("not json")
    assert protected_files(tmp_path / "server0") == []


# ---- a run without a manifest ------------------------------------------------------------


def test_without_a_manifest_the_rounds_come_from_the_files_tags(tmp_path):
    """A cluster without a launcher (a spec, Kubernetes) writes no manifest."""
    root = _run(tmp_path / "checkpoints", record=False)
    assert not (root / MANIFEST).exists()
    assert cset.resume_point(root).step == 280
    _truncate(root / "server1/ckpt-0000000280.npz")
    point = read_resume_point(_config(tmp_path))
    assert [s.seq for s in point.snapshots] == [260, 260]
    [note] = point.notes
    assert note.startswith(f"resume: {root} has no {MANIFEST}; resuming from round 260, the "
                           f"newest round readable on every server (server0 at update 260, "
                           f"server1 at update 260), passing over server0/ckpt-0000000280.npz "
                           f"(its round is not on every server); server1/ckpt-0000000280.npz: "
                           f"unreadable")


def test_without_a_manifest_the_final_checkpoints_are_a_round(tmp_path):
    _run(tmp_path, record=False)
    _write(tmp_path, 0, 291, final=True)
    _write(tmp_path, 1, 293, final=True)
    point = cset.resume_point(tmp_path)
    assert [s.seq for s in point.snapshots] == [291, 293] and point.notes == []


def test_an_older_run_resumes_from_newest_files_of_one_step(tmp_path):
    root = _run(tmp_path, tagged=False, record=False)
    point = cset.resume_point(root)
    assert [s.seq for s in point.snapshots] == [280, 280] and point.notes == []
    _truncate(root / "server0/ckpt-0000000280.npz")
    _truncate(root / "server1/ckpt-0000000280.npz")
    point = cset.resume_point(root)
    assert [s.seq for s in point.snapshots] == [260, 260]
    assert len(point.notes) == 3 and "server0/ckpt-0000000280.npz" in point.notes[0]
    assert point.notes[-1] == (f"resume: resuming from update 260 on every server (no "
                               f"{MANIFEST}: a run of an older tinyps)")


def test_an_older_run_whose_newest_files_are_of_different_steps_is_refused(tmp_path):
    root = _run(tmp_path / "checkpoints", tagged=False, record=False)
    _truncate(root / "server1/ckpt-0000000280.npz")
    with pytest.raises(CheckpointError) as err:
        read_resumed(_config(tmp_path))
    assert str(err.value) == (
        f"resume: {root} has no {MANIFEST}, and no round of checkpoints is complete on every "
        f"server; their newest readable checkpoints are at different updates (server0: 280, "
        f"server1: 260): resuming would mix two moments of the model")


def test_without_a_manifest_a_server_without_files_is_named(tmp_path):
    _run(tmp_path, record=False)
    for path in list_checkpoints(server_directory(tmp_path, 1)):
        os.remove(path)
    with pytest.raises(CheckpointError, match="server1: no readable checkpoint"):
        cset.resume_point(tmp_path)
    with pytest.raises(CheckpointError, match="no manifest.json and no server directories"):
        cset.resume_point(tmp_path / "nothing")
