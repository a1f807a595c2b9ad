"""Signals are idempotent: a second or third SIGINT/SIGTERM to a server or a worker that is
already on its way out never hangs it (students press Ctrl-C twice).

Real processes: `tinyps server` and `tinyps worker` as a user starts them, each signalled
three times in a row while it is busy stopping.
"""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ps.checkpoint import latest_checkpoint
from ps.client import PSClient
from tests.deadline import in_thread, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30.0
# Big enough that the final checkpoint takes a while to write: the repeated signals land
# while the first stop is still under way.
PARAMS = {"w": np.ones((4096, 4096), np.float32)}  # 64 MiB


def _start(tmp_path: Path, *args: str, ready: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinyps", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / "server.address"
    proc = _start(tmp_path, "server", "--port", "0", "--ready-file", str(ready), *args)
    deadline = time.monotonic() + DEADLINE_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[0]}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.05)  # polls the ready file with a deadline; returns early if it dies
    return proc, ready.read_text().strip()


def _end(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=10)[0]


def _again(proc: subprocess.Popen, sig: int, times: int = 2) -> None:
    """Signal `times` more, a little apart: signals sent at once coalesce into one."""
    for _ in range(times):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.02)  # spaces the signals; returns early if the process is gone
        if proc.poll() is None:
            proc.send_signal(sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_server_signalled_three_times_stops_once_and_exits(tmp_path, sig):
    proc, address = _server(tmp_path, "--mode", "sync", "--workers", "2", "--checkpoint-dir",
                            str(tmp_path / "ck"), "--checkpoint-every", "1000")
    try:
        with PSClient([address], worker_id=0, retry_s=0.5) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            waiting = in_thread(lambda: client.pull(0))  # at the start line: worker 1 is away
            wait_until(lambda: client.stats()[0]["waiting"] >= 1, "the pull waits")
            proc.send_signal(sig)
            with contextlib.suppress(Exception):
                waiting()  # answered UNAVAILABLE: the stop is under way
            _again(proc, sig)  # while it writes its final checkpoint
        code = proc.wait(DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server hung after three signals:\n{_end(proc)}") from None
    finally:
        log = _end(proc)
    assert code == 0, log
    assert log.count("tinyps server: stopped") == 1, log
    assert latest_checkpoint(tmp_path / "ck") is not None  # its final checkpoint, once


def test_a_server_told_to_stop_by_the_shutdown_call_and_a_signal_exits(tmp_path):
    proc, address = _server(tmp_path, "--checkpoint-dir", str(tmp_path / "ck"))
    try:
        with PSClient([address], retry_s=0.5) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            client.shutdown()
        proc.send_signal(signal.SIGINT)
        _again(proc, signal.SIGINT)
        code = proc.wait(DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server hung:\n{_end(proc)}") from None
    finally:
        log = _end(proc)
    assert code == 0, log


def test_a_server_signalled_until_it_has_exited_exits_0(tmp_path):
    """Signals go on landing after the stop and through the interpreter's exit: not one of
    them may kill the process by its default action (exit -2 instead of 0)."""
    proc, _ = _server(tmp_path)
    deadline = time.monotonic() + DEADLINE_S
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.002)
    log = _end(proc)
    assert proc.returncode == 0, log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_worker_signalled_three_times_at_a_barrier_exits(tmp_path, sig):
    server, address = _server(tmp_path, "--mode", "sync", "--workers", "2")
    metrics = tmp_path / "worker0.jsonl"
    worker = _start(tmp_path, "worker", "--servers", address, "--workers", "2", "--index",
                    "0", "--steps", "50", "--hidden", "8", "--metrics", str(metrics))
    try:
        with PSClient([address], retry_s=0.5) as client:
            # Worker 0 waits at the start line for worker 1, who never comes.
            wait_until(lambda: worker.poll() is not None or client.stats()[0]["waiting"] >= 1,
                       "the worker waits at the barrier", deadline_s=60)
        assert worker.poll() is None, _end(worker)
        worker.send_signal(sig)
        _again(worker, sig)
        code = worker.wait(DEADLINE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker hung after three signals:\n{_end(worker)}") \
            from None
    finally:
        log = _end(worker)
        _end(server)
    assert code == 130, log
    assert "Traceback" not in log, log


def test_a_stop_whose_final_checkpoint_fails_still_stops_and_a_second_stop_returns(tmp_path):
    from ps.server import serve

    running = serve(checkpoint_dir=str(tmp_path / "ck"))
    with PSClient([running.address]) as client:
        client.init({"w": np.ones(4, np.float32)}, "sgd", lr=0.1)

    def full_disk() -> int:
        raise OSError(28, "No space left on device")

    running._checkpointer.write = full_disk  # the final write fails, as on a full disk
    first = in_thread(running.stop)
    wait_until(lambda: running._claimed, "the first stop began")
    assert running.stop(timeout=20) is True  # a second stop waits for the first, then returns
    with pytest.raises(OSError, match="No space left"):
        first()
    assert running.wait(0)  # stopped all the same: `tinyps server` exits, nothing hangs
    assert running.stop(timeout=0) is True  # and again: at once
