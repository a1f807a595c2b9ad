"""Checkpoints: bit-exact round trips, atomic writes under SIGKILL, resplit over new servers."""

import json
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import ps.checkpoint as ckpt
from ps.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    latest_set,
    list_checkpoints,
    read_checkpoint,
    server_directory,
    write_checkpoint,
)
from ps.keys import Key, cut
from ps.optimizer import OptimizerConfig
from ps.placement import TensorSpec, place
from ps.resplit import resplit
from ps.snapshot import KeyState, Snapshot

REPO = os.fspath(Path(__file__).resolve().parents[1])  # the subprocess imports ps
# ±0, subnormals, near-max: a checkpoint keeps their bits (inf and NaN it refuses, below).
AWKWARD = np.array([0.0, -0.0, 1.0, -1.5, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.2e-38, 2.5],
                   np.float32)


def _optimizer_state(name: str, size: int, rng, step: int = 7) -> dict:
    if name == "momentum":
        return {"buf": rng.standard_normal(size).astype(np.float32)}
    if name == "adam":
        return {"m": rng.standard_normal(size).astype(np.float32),
                "v": rng.random(size).astype(np.float32), "step": step}
    return {}


def _snapshot(optimizer: str = "adam", seq: int = 5, workers: int = 3) -> Snapshot:
    rng = np.random.default_rng(0)
    keys = [
        Key("dense0.weight", (4, 10), 0, 23),
        Key("dense0.weight", (4, 10), 23, 40),
        Key("dense0.bias", (10,), 0, 10),
        Key("scale", (), 0, 1),  # a 0-d tensor is one element
    ]
    states = []
    for i, key in enumerate(keys):
        value = rng.standard_normal(2 * key.size).astype(np.float32)[::2]  # non-contiguous
        if key.size >= AWKWARD.size:
            value[: AWKWARD.size] = AWKWARD
        clocks = rng.integers(0, 100, workers).astype(np.int64)
        states.append(KeyState(key, value, 10 + i, clocks,
                               _optimizer_state(optimizer, key.size, rng, step=3 + i)))
    return Snapshot(
        mode="ssp", workers=workers, optimizer=OptimizerConfig(optimizer, lr=0.05),
        keys=states, counters={"updates": 12, "pushes": 36, "staleness": [30, 5, 0, 1]}, seq=seq,
    )


def _assert_same(got: Snapshot, want: Snapshot) -> None:
    assert (got.mode, got.workers, got.optimizer, got.seq) == (
        want.mode, want.workers, want.optimizer, want.seq)
    assert got.counters == want.counters
    assert len(got.keys) == len(want.keys)
    for g, w in zip(got.keys, want.keys, strict=True):
        assert g.key == w.key and g.version == w.version
        assert g.value.dtype == np.float32 and g.clocks.dtype == np.int64
        assert g.value.flags.writeable and g.clocks.flags.writeable
        # Bits, not values: -0.0 and NaN must survive.
        np.testing.assert_array_equal(g.value.view(np.uint32), np.asarray(w.value).view(np.uint32))
        np.testing.assert_array_equal(g.clocks, w.clocks)
        assert g.optimizer.keys() == w.optimizer.keys()
        for name, state in w.optimizer.items():
            if isinstance(state, np.ndarray):
                assert g.optimizer[name].dtype == np.float32
                np.testing.assert_array_equal(g.optimizer[name].view(np.uint32),
                                              state.view(np.uint32))
            else:
                assert g.optimizer[name] == state and isinstance(g.optimizer[name], int)


def _seqs(directory) -> list[int]:
    return [int(p.name[5:15]) for p in list_checkpoints(directory)]


# ---- one file -----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_write_then_read_gives_back_the_same_snapshot(tmp_path, optimizer):
    snapshot = _snapshot(optimizer)
    path = write_checkpoint(tmp_path, snapshot)
    assert path == tmp_path / "ckpt-0000000005.npz"
    _assert_same(read_checkpoint(path), snapshot)
    with np.load(path, allow_pickle=False) as npz:  # the format the brief promises, no pickle
        assert npz["meta"].shape == () and npz["meta"].dtype.kind == "U"
        assert {"value_0", "clocks_3"} <= set(npz.files)


def test_a_snapshot_without_keys_round_trips(tmp_path):
    snapshot = Snapshot("async", 0, OptimizerConfig(), [], {}, seq=0)
    _assert_same(read_checkpoint(write_checkpoint(tmp_path / "new" / "dir", snapshot)), snapshot)


def test_writing_the_same_seq_again_replaces_it(tmp_path):
    first, second = _snapshot(seq=4), _snapshot(seq=4)
    second.keys[0].value[:] = 42.0
    write_checkpoint(tmp_path, first)
    write_checkpoint(tmp_path, second)
    assert _seqs(tmp_path) == [4]
    _assert_same(read_checkpoint(tmp_path / "ckpt-0000000004.npz"), second)


def test_keep_leaves_only_the_newest(tmp_path):
    for seq in range(6):
        write_checkpoint(tmp_path, _snapshot(seq=seq), keep=3)
    assert _seqs(tmp_path) == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-0000000003.npz", "ckpt-0000000004.npz", "ckpt-0000000005.npz"]
    assert latest_checkpoint(tmp_path).seq == 5


def test_list_orders_by_seq_and_ignores_other_files(tmp_path):
    for seq in (12, 3, 100):
        write_checkpoint(tmp_path, _snapshot(seq=seq), keep=10)
    (tmp_path / "ckpt-0000000200.npz.abc.tmp").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert _seqs(tmp_path) == [3, 12, 100]
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        write_checkpoint(tmp_path, _snapshot(), keep=0)
    assert list(tmp_path.iterdir()) == []


def test_a_value_of_the_wrong_size_is_refused_before_any_file_is_written(tmp_path):
    snapshot = _snapshot()
    snapshot.keys[1].value = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"dense0.weight\[23:40\]"):
        write_checkpoint(tmp_path, snapshot)
    assert not tmp_path.joinpath("ckpt-0000000005.npz").exists()


# ---- non-finite values: refused, never in the place of a good checkpoint -------------------


def _poison(snapshot: Snapshot, where: str, bad: float) -> str:
    """Put `bad` in one array of key 1 (dense0.weight[23:40]); the name the error must say."""
    state = snapshot.keys[1]
    if where == "value":
        state.value[5] = bad
    else:
        state.optimizer[where][16] = bad
    return r"dense0.weight\[23:40\]"


@pytest.mark.parametrize("optimizer, where", [
    ("sgd", "value"), ("momentum", "buf"), ("adam", "m"), ("adam", "v"), ("adam", "value")])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_snapshot_holding_inf_or_nan_is_refused_and_the_good_ones_stay(tmp_path, optimizer,
                                                                        where, bad):
    good = [_snapshot(optimizer, seq=seq) for seq in (1, 2, 3)]
    for snapshot in good:
        write_checkpoint(tmp_path, snapshot, keep=3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    poisoned = _snapshot(optimizer, seq=4)
    key = _poison(poisoned, where, bad)
    with pytest.raises(CheckpointError, match=f"{key}.*non-finite") as err:
        write_checkpoint(tmp_path, poisoned, keep=3)
    assert (where == "value") == ("the value" in str(err.value))  # names the array too
    # Refused before any file was touched: nothing pruned, nothing left half-written.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _assert_same(latest_checkpoint(tmp_path), good[-1])


def test_a_file_holding_inf_is_unreadable_and_the_one_before_it_is_taken(tmp_path):
    previous = _snapshot(seq=1)
    write_checkpoint(tmp_path, previous)
    arrays = ckpt._pack(_snapshot(seq=2))  # a file an older tinyps could have written
    arrays["opt_2_v"][3] = np.inf
    with open(tmp_path / "ckpt-0000000002.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=r"dense0.bias\[0:10\]: optimizer state 'v' "
                                              r"holds 1 non-finite"):
        read_checkpoint(tmp_path / "ckpt-0000000002.npz")
    # A restarted server takes the newest file it can restore, not one it would refuse.
    _assert_same(latest_checkpoint(tmp_path), previous)


def test_old_files_are_pruned_only_after_the_new_one_is_on_disk(tmp_path, monkeypatch):
    previous = _snapshot(seq=1)
    write_checkpoint(tmp_path, previous, keep=1)

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 a few bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path, _snapshot(seq=2), keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000001.npz"]  # no .tmp
    _assert_same(latest_checkpoint(tmp_path), previous)


def test_a_protected_file_is_never_pruned(tmp_path):
    kept = write_checkpoint(tmp_path, _snapshot(seq=1), keep=2)
    for seq in range(2, 6):
        write_checkpoint(tmp_path, _snapshot(seq=seq), keep=2, protect=[kept])
    assert _seqs(tmp_path) == [1, 4, 5]
    write_checkpoint(tmp_path, _snapshot(seq=6), keep=2)
    assert _seqs(tmp_path) == [5, 6]


def test_the_round_and_final_flag_go_into_the_meta(tmp_path):
    path = write_checkpoint(tmp_path, _snapshot(seq=7), round_step=5, final=True)
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"][()]))
    assert (meta["round"], meta["final"], meta["seq"]) == (5, True, 7)
    assert read_checkpoint(path).seq == 7


# ---- crashes ------------------------------------------------------------------------------


def test_a_failed_rename_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    previous = _snapshot(seq=1)
    write_checkpoint(tmp_path, previous)

    def crash(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        write_checkpoint(tmp_path, _snapshot(seq=2))
    monkeypatch.undo()
    assert _seqs(tmp_path) == [1]
    assert list(tmp_path.glob("*.tmp")) == []  # the writer cleans up its own temporary
    _assert_same(latest_checkpoint(tmp_path), previous)


def test_a_stale_tmp_is_never_a_checkpoint_and_the_next_write_deletes_it(tmp_path):
    write_checkpoint(tmp_path, _snapshot(seq=1))
    stale = tmp_path / "ckpt-0000000002.npz.x1y2.tmp"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"PK\x03\x04 truncated")
    assert _seqs(tmp_path) == [1]
    assert latest_checkpoint(tmp_path).seq == 1
    write_checkpoint(tmp_path, _snapshot(seq=2))
    assert not stale.exists()
    assert _seqs(tmp_path) == [1, 2]


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from ps.checkpoint import write_checkpoint
    from ps.keys import Key
    from ps.optimizer import OptimizerConfig
    from ps.snapshot import KeyState, Snapshot

    directory, n = sys.argv[1], int(sys.argv[2])
    key = Key("w", (n,), 0, n)
    deadline = time.monotonic() + 60  # never outlive a test that forgot to kill us
    seq = 0
    while time.monotonic() < deadline:
        state = KeyState(key, np.full(n, seq, np.float32), seq, np.full(2, seq, np.int64),
                         {"buf": np.full(n, -seq, np.float32)})
        write_checkpoint(directory, Snapshot("sync", 2, OptimizerConfig("momentum"), [state],
                                             {"updates": seq}, seq=seq), keep=3)
        if seq == 0:
            print("started", flush=True)
        seq += 1
""")


def test_sigkill_mid_write_leaves_every_listed_checkpoint_whole(tmp_path):
    n = 1 << 20  # 4 MiB value + 4 MiB momentum buffer per file: writes take a while
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, os.fspath(tmp_path), str(n)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    def fail(why):
        proc.kill()
        pytest.fail(f"{why}; the writer said: {proc.communicate()[1]}")

    try:
        deadline = time.monotonic() + 30
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready or proc.stdout.readline().strip() != "started":
            fail("no first checkpoint")
        # Let it write a few more, then kill it wherever it is: most likely mid-write.
        while not list_checkpoints(tmp_path) or _seqs(tmp_path)[-1] < 4:
            if time.monotonic() > deadline:
                fail("no progress")
            try:
                proc.wait(timeout=0.005)  # a short wait, which also notices an early exit
                fail(f"the writer exited with {proc.returncode}")
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    paths = list_checkpoints(tmp_path)
    assert 1 <= len(paths) <= 4  # keep=3, plus one if killed between rename and pruning
    for path in paths:
        snapshot = read_checkpoint(path)
        seq = snapshot.seq
        assert path.name == f"ckpt-{seq:010d}.npz"
        (state,) = snapshot.keys
        np.testing.assert_array_equal(state.value, np.full(n, seq, np.float32))
        np.testing.assert_array_equal(state.optimizer["buf"], np.full(n, -seq, np.float32))
        np.testing.assert_array_equal(state.clocks, [seq, seq])
        assert state.version == seq and snapshot.counters == {"updates": seq}
    assert latest_checkpoint(tmp_path).seq == _seqs(tmp_path)[-1] >= 4

    # Resuming where it stopped clears whatever half-written file the kill left behind.
    resumed = latest_checkpoint(tmp_path)
    resumed.seq += 1
    write_checkpoint(tmp_path, resumed, keep=3)
    assert list(tmp_path.glob("*.tmp")) == []
    assert len(list_checkpoints(tmp_path)) == 3


# ---- corrupt files ------------------------------------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte_of_the_data(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside an array: the zip's CRC catches it
    path.write_bytes(bytes(data))


def _empty(path):
    path.write_bytes(b"")


def _wrong_format(path):
    snapshot = _snapshot()
    arrays = ckpt._pack(snapshot)
    arrays["meta"] = np.array(str(arrays["meta"][()]).replace('"format": 1', '"format": 99'))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _missing_array(path):
    arrays = ckpt._pack(_snapshot())
    del arrays["value_2"]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _pickled(path):
    with open(path, "wb") as f:
        np.savez(f, meta=np.array([{"format": 1}], dtype=object))


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "unreadable"),
    (_flip_a_byte_of_the_data, "CRC"),
    (_empty, "unreadable"),
    (_wrong_format, "format version 99"),
    (_missing_array, "value_2"),
    (_pickled, "unreadable"),
])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, problem):
    previous = _snapshot(seq=1)
    write_checkpoint(tmp_path, previous)
    newest = write_checkpoint(tmp_path, _snapshot(seq=2))
    damage(newest)
    with pytest.raises(CheckpointError, match=problem) as err:
        read_checkpoint(newest)
    assert str(newest) in str(err.value)
    _assert_same(latest_checkpoint(tmp_path), previous)


def test_reading_a_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="ckpt-0000000009.npz"):
        read_checkpoint(tmp_path / "ckpt-0000000009.npz")


def test_only_corrupt_checkpoints_means_none(tmp_path):
    _truncate(write_checkpoint(tmp_path, _snapshot(seq=1)))
    assert latest_checkpoint(tmp_path) is None


# ---- a run's set of servers ---------------------------------------------------------------


def test_latest_set_reads_every_server_in_index_order(tmp_path):
    for server in (0, 1, 2, 10):  # 10 sorts before 2 as a string
        for seq in (server, server + 1):
            write_checkpoint(server_directory(tmp_path, server), _snapshot(seq=seq))
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=r"\[0, 1, 2, 10\]"):
        latest_set(tmp_path)  # a gap: servers 3..9 are missing
    for server in range(3, 10):
        write_checkpoint(server_directory(tmp_path, server), _snapshot(seq=server + 1))
    assert server_directory(tmp_path, 4) == tmp_path / "server4"
    assert [s.seq for s in latest_set(tmp_path)] == [s + 1 for s in range(11)]


def test_latest_set_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no server directories"):
        latest_set(tmp_path)
    write_checkpoint(server_directory(tmp_path, 0), _snapshot())
    server_directory(tmp_path, 1).mkdir()
    with pytest.raises(CheckpointError, match="server1: no readable checkpoint"):
        latest_set(tmp_path)


# ---- resplit ------------------------------------------------------------------------------

SPECS = [TensorSpec("dense0.weight", (64, 128)), TensorSpec("dense0.bias", (128,)),
         TensorSpec("dense1.weight", (128, 10)), TensorSpec("dense1.bias", (10,))]
WORKERS = 3


def _old_run(optimizer: str, rng):
    """Full tensors, and the snapshots of 2 servers holding them in 250-element keys.

    Also, per tensor and element, the version, clocks and Adam step of the old key holding it:
    the reference the minimums of resplit are checked against.
    """
    full = {s.name: rng.standard_normal(math.prod(s.shape)).astype(np.float32) for s in SPECS}
    full["dense0.bias"][:3] = [-0.0, 3.4e38, 1e-45]  # bits kept (inf and NaN are refused)
    opt = {s.name: _optimizer_state(optimizer, math.prod(s.shape), rng) for s in SPECS}
    per_element = {s.name: {"version": np.zeros(math.prod(s.shape), np.int64),
                            "step": np.zeros(math.prod(s.shape), np.int64),
                            "clocks": np.zeros((math.prod(s.shape), WORKERS), np.int64)}
                   for s in SPECS}
    placement = place(SPECS, 2, "size_balanced", split_bytes=4096)
    snapshots = []
    for server, keys in cut(placement, chunk_bytes=1000).items():
        states = []
        for key in keys:
            sl = slice(key.start, key.stop)
            version, step = int(rng.integers(20, 40)), int(rng.integers(1, 9))
            clocks = rng.integers(5, 15, WORKERS).astype(np.int64)
            state = {n: a[sl].copy() for n, a in opt[key.name].items() if n != "step"}
            if optimizer == "adam":
                state["step"] = step
            states.append(KeyState(key, full[key.name][sl].copy(), version, clocks, state))
            ref = per_element[key.name]
            ref["version"][sl], ref["step"][sl], ref["clocks"][sl] = version, step, clocks
        snapshots.append(Snapshot("sync", WORKERS, OptimizerConfig(optimizer), states,
                                  {"updates": 10 + server, "staleness": [4] * (2 + server)},
                                  seq=min(s.version for s in states)))
    return full, opt, per_element, snapshots


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("servers, chunk_bytes", [(3, 1500), (1, 1 << 22), (4, 36)])
def test_resplit_reassembles_the_model_exactly(tmp_path, optimizer, servers, chunk_bytes):
    rng = np.random.default_rng(7)
    full, opt, per_element, old = _old_run(optimizer, rng)
    # Through files: every old server writes its shard, the restart reads them back.
    for server, snapshot in enumerate(old):
        write_checkpoint(server_directory(tmp_path, server), snapshot)
    old = latest_set(tmp_path)
    names = [[s.key.name for s in snapshot.keys] for snapshot in old]
    assert set(names[0]) & set(names[1]), "no tensor is split across the old servers"
    assert max(names[0].count(n) for n in names[0]) > 1, "no tensor is cut into several keys"

    layout = cut(place(SPECS, servers, "size_balanced", split_bytes=2048), chunk_bytes)
    got = {name: np.full(a.size, np.float32(12345), np.float32) for name, a in full.items()}
    got_opt = {name: {n: np.zeros_like(a) for n, a in state.items() if n != "step"}
               for name, state in opt.items()}
    for server in range(servers):
        new = resplit(old, layout[server])
        assert (new.mode, new.workers, new.optimizer) == ("sync", WORKERS,
                                                          OptimizerConfig(optimizer))
        assert new.counters == {"updates": 21, "staleness": [8, 8, 4]}
        assert [s.key for s in new.keys] == layout[server]
        assert new.seq == min(s.version for s in new.keys)
        for state in new.keys:
            key, sl = state.key, slice(state.key.start, state.key.stop)
            ref = per_element[key.name]
            got[key.name][sl] = state.value
            for n, a in state.optimizer.items():
                if n != "step":
                    got_opt[key.name][n][sl] = a
            assert state.version == ref["version"][sl].min()
            np.testing.assert_array_equal(state.clocks, ref["clocks"][sl].min(axis=0))
            if optimizer == "adam":
                assert state.optimizer["step"] == ref["step"][sl].min()
            assert state.optimizer.keys() == opt[key.name].keys()
    for name, want in full.items():
        np.testing.assert_array_equal(got[name].view(np.uint32), want.view(np.uint32))
        for n, a in got_opt[name].items():
            np.testing.assert_array_equal(a, opt[name][n])


def test_resplit_takes_seq_when_given():
    _, _, _, old = _old_run("sgd", np.random.default_rng(1))
    layout = cut(place(SPECS, 1), 1 << 22)[0]
    assert resplit(old, layout, seq=3).seq == 3


def test_resplit_refuses_an_uncovered_range():
    _, _, _, old = _old_run("adam", np.random.default_rng(1))
    dropped = next(s for s in old[0].keys if s.key.name == "dense0.weight" and s.key.start > 0)
    old[0].keys.remove(dropped)
    layout = cut(place(SPECS, 1), 1 << 22)[0]
    gap = rf"'dense0.weight': elements \[{dropped.key.start}:{dropped.key.stop}\]"
    with pytest.raises(CheckpointError, match=gap):
        resplit(old, layout)
    missing = [k for k in layout if k.name == "dense1.bias"]
    old[1].keys = [s for s in old[1].keys if s.key.name != "dense1.bias"]
    old[0].keys = [s for s in old[0].keys if s.key.name != "dense1.bias"]
    with pytest.raises(CheckpointError, match=r"'dense1.bias': elements \[0:10\]"):
        resplit(old, missing)


def test_resplit_refuses_a_changed_model():
    _, _, _, old = _old_run("sgd", np.random.default_rng(1))
    specs = [*SPECS[:3], TensorSpec("dense1.bias", (12,))]
    layout = cut(place(specs, 1), 1 << 22)[0]
    with pytest.raises(CheckpointError, match=r"'dense1.bias': shape \(10,\).*\(12,\)"):
        resplit(old, layout)


@pytest.mark.parametrize("change", [
    {"mode": "async"}, {"workers": WORKERS + 1}, {"optimizer": OptimizerConfig("sgd", lr=1.0)},
])
def test_resplit_refuses_snapshots_of_different_runs(change):
    _, _, _, old = _old_run("sgd", np.random.default_rng(1))
    old[1] = replace(old[1], **change)
    with pytest.raises(CheckpointError, match=f"disagree on {next(iter(change))}"):
        resplit(old, cut(place(SPECS, 1), 1 << 22)[0])


def test_resplit_refuses_overlapping_old_keys_and_an_empty_layout():
    _, _, _, old = _old_run("sgd", np.random.default_rng(1))
    with pytest.raises(CheckpointError, match="overlap"):
        resplit([old[0], old[0]], cut(place(SPECS, 1), 1 << 22)[0])
    with pytest.raises(ValueError, match="layout"):
        resplit(old, [])
