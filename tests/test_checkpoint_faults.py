"""Disk faults are faults, not crashes: a checkpoint write that fails (a full disk, a file over
the size limit, a refused snapshot) is counted in Stats with its message, the server goes on
serving, the next write tries again, and no .tmp or damaged checkpoint is left behind."""

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from deadline import DEADLINE_S, wait_until

import ps.checkpoint as ckpt
from ps.checkpoint import list_checkpoints, read_checkpoint
from ps.client import PSClient
from ps.server import serve

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"dense0.weight": np.ones((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}
LR = 0.5


def _grads() -> dict[str, np.ndarray]:
    return {name: np.ones(value.shape, np.float32) for name, value in PARAMS.items()}


def _seqs(directory: Path) -> list[int]:
    return [read_checkpoint(p).seq for p in list_checkpoints(directory)]


def _no_tmp(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def _push(client: PSClient, steps: range) -> None:
    for step in steps:
        client.push(_grads(), step)


# ---- in this process: a writer that fails on demand ---------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """While set, every checkpoint's bytes stop part way with ENOSPC, as on a full disk."""
    failing = threading.Event()
    savez = np.savez

    def writer(f, **arrays):
        if failing.is_set():
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return savez(f, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", writer)
    return failing


def test_a_failing_write_is_counted_the_server_goes_on_and_the_next_write_works(tmp_path,
                                                                               full_disk):
    running = serve(mode="sync", workers=1, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=LR)
            wait_until(lambda: _seqs(tmp_path) == [0], "the first checkpoint")
            first = (tmp_path / "ckpt-0000000000.npz").read_bytes()
            full_disk.set()
            _push(client, range(4))  # versions 2 and 4: checkpoints due
            wait_until(lambda: client.stats()[0]["checkpoint_failures"] >= 1,
                       "Stats counts the failed write")
            stats = client.stats()[0]
            assert stats["checkpoints_written"] == 1
            error = stats["checkpoint_error"]
            assert error.startswith(f"cannot write checkpoint {tmp_path}/ckpt-00000000")
            assert error.endswith("No space left on device [ENOSPC]")
            # The server goes on: it answers, it trains, its checkpointer still runs.
            got = client.pull(4)
            np.testing.assert_array_equal(got["dense0.weight"], np.full((3, 2), 1 - 4 * LR))
            assert running._thread.is_alive()
            _no_tmp(tmp_path)
            assert (tmp_path / "ckpt-0000000000.npz").read_bytes() == first

            full_disk.clear()  # space again: the next multiple is written
            _push(client, range(4, 6))
            wait_until(lambda: 6 in _seqs(tmp_path), "the checkpoint at version 6")
            stats = client.stats()[0]
            assert stats["checkpoints_written"] == 2
            failures = stats["checkpoint_failures"]
            # Still the latest failure (the checkpointer may have tried once or twice).
            assert failures >= 1 and re.fullmatch(
                rf"cannot write checkpoint {tmp_path}/ckpt-000000000[2-4]\.npz: "
                rf"No space left on device \[ENOSPC\]", stats["checkpoint_error"])
            saved = read_checkpoint(tmp_path / "ckpt-0000000006.npz")
            assert saved.counters["checkpoint_failures"] == failures
            np.testing.assert_array_equal(saved.keys[0].value, client.pull(6)[
                saved.keys[0].key.name].reshape(-1)[saved.keys[0].key.start:
                                                    saved.keys[0].key.stop])
        full_disk.set()  # the final write fails too: stopping must not raise or hang
        running.stop(0)
        assert running.wait(0)
        assert running._checkpointer.failures == failures + 1
        _no_tmp(tmp_path)
        assert _seqs(tmp_path) == [0, 6]
    finally:
        running.stop(0)


def test_a_refused_snapshot_is_a_failure_and_keeps_the_good_checkpoint(tmp_path):
    running = serve(mode="sync", workers=1, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                    keep_checkpoints=1)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "adam", lr=0.01)
            wait_until(lambda: _seqs(tmp_path) == [0], "the first checkpoint")
            good = (tmp_path / "ckpt-0000000000.npz").read_bytes()
            snapshot = running.store.snapshot

            def poisoned():  # as a store that let inf through would hand out
                taken = snapshot()
                taken.keys[-1].optimizer["v"][1] = np.inf
                return taken

            running.store.snapshot = poisoned
            _push(client, range(2))
            wait_until(lambda: client.stats()[0]["checkpoint_failures"] >= 1, "a refusal")
            error = client.stats()[0]["checkpoint_error"]
            assert error.startswith(f"refused checkpoint {tmp_path}/ckpt-00000000")
            assert "optimizer state 'v' holds 1 non-finite value" in error
            assert client.pull(2)["dense0.bias"].shape == (2,)  # still serving
            # keep_checkpoints=1, and still the good one is there, whole.
            assert (tmp_path / "ckpt-0000000000.npz").read_bytes() == good
            _no_tmp(tmp_path)
            running.store.snapshot = snapshot
            _push(client, range(2, 3))
            wait_until(lambda: _seqs(tmp_path) == [3], "a good checkpoint again")
    finally:
        running.stop(0)


# ---- a server process on a real small disk, or over its file size limit -------------------


def _start_server(tmp_path: Path, checkpoints: Path) -> subprocess.Popen:
    ready = tmp_path / "server.address"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyps", "server", "--port", "0", "--ready-file", str(ready),
         "--mode", "sync", "--workers", "1", "--checkpoint-dir", str(checkpoints),
         "--checkpoint-every", "2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, "the server to start")
        assert ready.exists(), f"the server did not start: {proc.communicate()[1]}"
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    proc.address = ready.read_text().strip()
    return proc


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real file system that runs out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                 capture_output=True, text=True, timeout=DEADLINE_S)
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small file system")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True, timeout=DEADLINE_S)


def _fill(disk: Path) -> Path:
    """Take every free byte of disk; the file to delete to give them back."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def _over_the_size_limit(proc: subprocess.Popen, on: bool) -> None:
    """RLIMIT_FSIZE of the server: on, no file may grow past 1 KiB (writes fail with EFBIG:
    Python ignores SIGXFSZ); off, no limit."""
    limit = 1024 if on else resource.RLIM_INFINITY
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True,
                   timeout=DEADLINE_S)


@pytest.mark.parametrize("fault", ["full_disk", "read_only", "file_too_large"])
def test_a_server_process_outlives_disk_faults_and_writes_again_after(tmp_path, request, fault):
    reason = {"full_disk": "No space left on device [ENOSPC]",
              "read_only": "Read-only file system [EROFS]",
              "file_too_large": "File too large [EFBIG]"}[fault]
    if fault == "file_too_large":
        checkpoints = tmp_path / "ck"
    else:
        checkpoints = request.getfixturevalue("small_disk") / "ck"
    proc = _start_server(tmp_path, checkpoints)
    filler: list[Path] = []

    def fault_on() -> None:
        if fault == "full_disk":
            filler.append(_fill(checkpoints.parent))
        elif fault == "read_only":
            _remount(checkpoints.parent, "ro")
        else:
            _over_the_size_limit(proc, True)

    def fault_off() -> None:
        if fault == "full_disk":
            filler.pop().unlink()
        elif fault == "read_only":
            _remount(checkpoints.parent, "rw")
        else:
            _over_the_size_limit(proc, False)

    try:
        with PSClient([proc.address]) as client:
            client.init(PARAMS, "momentum", lr=LR, momentum=0.5)
            wait_until(lambda: _seqs(checkpoints) == [0], "the first checkpoint")
            first = read_checkpoint(checkpoints / "ckpt-0000000000.npz")
            fault_on()
            _push(client, range(4))
            wait_until(lambda: client.stats()[0]["checkpoint_failures"] >= 1, "a failed write")
            error = client.stats()[0]["checkpoint_error"]
            assert error.startswith(f"cannot write checkpoint {checkpoints}/ckpt-00000000")
            assert reason in error, error
            assert client.pull(4)["dense0.bias"].shape == (2,)  # still serving
            _no_tmp(checkpoints)
            fault_off()
            _push(client, range(4, 6))
            wait_until(lambda: 6 in _seqs(checkpoints), "a checkpoint once the fault is gone")
            failures = client.stats()[0]["checkpoint_failures"]
            fault_on()  # and the final write fails: the server still stops, and exits 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
        log = proc.stderr.read()
        assert log.count("cannot write checkpoint") == failures + 1, log
        assert f"{failures + 1} failed so far; the next checkpoint tries again" in log
        _no_tmp(checkpoints)
        if fault == "read_only":
            fault_off()  # for the fixture's umount
        assert _seqs(checkpoints) == [0, 6]  # the good ones are whole
        again = read_checkpoint(checkpoints / "ckpt-0000000000.npz")
        np.testing.assert_array_equal(again.keys[0].value, first.keys[0].value)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
