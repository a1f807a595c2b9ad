"""Servers through faults, over gRPC: checkpoints and restores, a graceful SIGTERM, workers
that leave or fall silent, and a retried PushPull applied once."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from bits import assert_same_arrays
from deadline import DEADLINE_S, in_thread, wait_until

import tinyps
from ps import ps_pb2
from ps.checkpoint import latest_checkpoint, list_checkpoints, server_directory
from ps.checkpoint_set import read_manifest
from ps.client import PSClient, PSError
from ps.codec import write_slice
from ps.server import serve
from tinyps.config import LaunchConfig
from tinyps.plan import prepare_launch
from tinyps.status import status_table

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"dense0.weight": np.ones((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


def _grads(x: float) -> dict[str, np.ndarray]:
    return {name: np.full(value.shape, x, np.float32) for name, value in PARAMS.items()}


def test_a_server_checkpoints_as_it_goes_and_once_more_when_it_stops(tmp_path):
    running = serve(mode="sync", workers=1, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                    keep_checkpoints=3)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "momentum", lr=0.1, momentum=0.9)
            for step in range(5):
                client.push(_grads(0.1 * (step + 1)), step)
            final = client.pull(5)
    finally:
        running.stop(0)
    paths = list_checkpoints(tmp_path)
    assert 1 <= len(paths) <= 3  # the last few are kept
    assert paths[-1].name == "ckpt-0000000005.npz"  # the final one, at version 5
    snapshot = latest_checkpoint(tmp_path)
    assert {k.version for k in snapshot.keys} == {5}
    assert snapshot.counters["checkpoints_written"] == running.checkpoints_written >= 2

    restarted = serve(mode="sync", workers=1, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                      restore=True)
    try:
        with PSClient([restarted.address]) as client:
            assert_same_arrays(client.pull(), final)
            stats = client.stats()[0]
            assert stats["restored_from"] == 5
            assert stats["updates"] == 5 * len(snapshot.keys)  # its counters came back
            # The momentum buffers came back too: one more step as the original would take.
            client.push(_grads(0.5), 5)
            after = client.pull(6)
    finally:
        restarted.stop(0)
    buf = {k.key.name: k.optimizer["buf"] for k in snapshot.keys}
    for name in PARAMS:
        expected = final[name].reshape(-1) - np.float32(0.1) * (
            np.float32(0.9) * buf[name] + np.float32(0.5))
        np.testing.assert_allclose(after[name].reshape(-1), expected, rtol=1e-6)


def _start_server_process(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str]:
    ready = tmp_path / "server.address"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyps", "server", "--port", "0", "--ready-file", str(ready),
         *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + DEADLINE_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[0]}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.05)  # polls the ready file with a deadline; returns early if it dies
    return proc, ready.read_text().strip()


def test_sigterm_answers_the_calls_in_flight_writes_a_final_checkpoint_and_exits_0(tmp_path):
    proc, address = _start_server_process(
        tmp_path, "--mode", "sync", "--workers", "2", "--checkpoint-dir", str(tmp_path / "ck"),
        "--checkpoint-every", "1000")
    try:
        with PSClient([address], worker_id=0, retry_s=0.5) as w0, \
                PSClient([address], worker_id=1) as w1:
            w0.init(PARAMS, "sgd", lr=0.5)
            start = [in_thread(lambda c=c: c.pull(0)) for c in (w0, w1)]
            for join in start:
                join()
            for step in range(3):
                w0.push(_grads(1.0), step)
                w1.push(_grads(3.0), step)
            expected = w0.pull(3)
            w0.push(_grads(1.0), 3)
            waiting = in_thread(lambda: w0.pull(4))  # blocked: worker 1 has not pushed
            wait_until(lambda: w1.stats()[0]["waiting"] == 1, "the pull waits in the server")
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(PSError) as err:
                waiting()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    snapshot = latest_checkpoint(tmp_path / "ck")
    assert {k.version for k in snapshot.keys} == {3}  # the half-gathered step 3 is not kept
    for k in snapshot.keys:
        np.testing.assert_array_equal(k.value, expected[k.key.name].reshape(-1)[
            k.key.start:k.key.stop])


def test_a_worker_that_leaves_no_longer_holds_the_barrier():
    running = serve(mode="sync", workers=2)
    try:
        with PSClient([running.address], worker_id=0) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            client.push(_grads(2.0), 0)
            assert client.leave(1) == 1
            assert client.leave(1) == 0  # already gone
            got = client.pull(1)  # at once: the step was applied with worker 0's gradient
            np.testing.assert_array_equal(got["dense0.bias"], -1.0)
            assert client.stats()[0]["live_workers"] == [0]
            assert "worker clocks (steps pushed): 0: 1, 1: 0 (gone)" in status_table(
                client.stats())
            with pytest.raises(PSError, match="worker 7 is out of range"):
                client.leave(7)
    finally:
        running.stop(0)


def test_a_hung_worker_is_dropped_when_its_lease_expires_and_the_run_goes_on():
    running = serve(mode="sync", workers=2, lease_s=0.3)
    try:
        with PSClient([running.address], worker_id=0) as w0, \
                PSClient([running.address], worker_id=1) as w1:
            w0.init(PARAMS, "sgd", lr=0.5)
            start = [in_thread(lambda c=c: c.pull(0)) for c in (w0, w1)]
            for join in start:
                join()
            # Worker 1 now hangs: it never pushes. Worker 0 goes on regardless.
            for step in range(3):
                w0.push_pull(_grads(1.0), step)
            stats = w0.stats()[0]
            assert stats["live_workers"] == [0]
            assert stats["min_version"] == 3
            # When it wakes up, it rejoins at the step the others are at.
            assert w1.start_step() == 3
            w1.pull(3)
            assert w0.stats()[0]["live_workers"] == [0, 1]
    finally:
        running.stop(0)


def test_a_retried_push_pull_is_applied_once():
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=0.5)
        request = ps_pb2.PushRequest(worker=0, step=0, grads=[
            write_slice(ps_pb2.Slice(), name, 0, np.ones(value.size, np.float32))
            for name, value in PARAMS.items()]).SerializeToString()
        with grpc.insecure_channel(running.address) as channel:
            push_pull = channel.unary_unary("/tinyps.ParameterServer/PushPull",
                                            response_deserializer=ps_pb2.PullReply.FromString)
            first = push_pull(request, timeout=DEADLINE_S)
            again = push_pull(request, timeout=DEADLINE_S)  # as if the first reply was lost
        assert [s.version for s in first.values] == [s.version for s in again.values] == [1, 1]
        assert running.store.stats()["updates"] == 2  # one per key, once
        assert first.values[0].data == again.values[0].data
    finally:
        running.stop(0)


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"scripted {self._code.name}"


def test_a_call_the_server_could_not_take_is_retried_and_others_are_not():
    # UNAVAILABLE: no server there; CANCELLED: a stopping server cancelled the call before it
    # started. Both mean "not now": the client calls again. Any other status is the answer.
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address], retry_s=DEADLINE_S) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            real = client._stubs[0]["Stats"]
            script = [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE]
            calls = []

            def flaky(request, **kwargs):
                calls.append(request)
                if script:
                    raise _Status(script.pop(0))
                return real(request, **kwargs)

            client._stubs[0]["Stats"] = flaky
            assert client.stats()[0]["address"] == running.address and len(calls) == 3
            script[:] = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(PSError, match="INVALID_ARGUMENT: scripted"):
                client.stats()
            assert len(calls) == 4  # not retried
    finally:
        running.stop(0)


def test_a_server_started_with_restore_and_no_checkpoint_starts_empty(tmp_path):
    running = serve(mode="async", workers=1, checkpoint_dir=str(tmp_path / "none"),
                    restore=True)
    try:
        assert running.store.stats()["initialised"] is False
    finally:
        running.stop(0)
    assert not os.path.exists(tmp_path / "none") or not list_checkpoints(tmp_path / "none")


@pytest.mark.slow  # a launch of two servers: about 15-25 s on 2 busy cores
def test_a_launched_run_resumes_from_the_newest_round_that_every_server_holds(tmp_path):
    first = tmp_path / "first"
    tinyps.launch(run_dir=str(first), servers=2, workers=1, mode="sync", seed=0, steps=40,
                  checkpoint_every=10)
    rounds = read_manifest(first / "checkpoints")
    assert (rounds[-1].step, rounds[-1].seqs) == (40, {0: 40, 1: 40})  # the final one
    assert rounds[-2].step == 30
    newest = first / "checkpoints" / rounds[-1].files[1]
    newest.write_bytes(newest.read_bytes()[:100])  # server1's newest, truncated
    plan = prepare_launch(LaunchConfig.from_flat({
        "servers": 2, "workers": 1, "mode": "sync", "seed": 0, "steps": 60,
        "resume": str(first), "run_dir": str(tmp_path / "second")}))
    assert plan.resume_round == 30
    assert [s.seq for s in plan.resumed] == [30, 30]  # not 30 on one server and 40 on the other
    [note] = plan.resume_notes
    assert "server1/ckpt-0000000040.npz: unreadable" in note
    assert note.endswith("resuming from round 30 on every server (server0 at update 30, "
                         "server1 at update 30)")
    # This run's servers start from it: round 30, re-split over this run's placement.
    assert [latest_checkpoint(server_directory(plan.checkpoints, i)).seq
            for i in range(2)] == [30, 30]
