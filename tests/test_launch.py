"""`tinyps launch` end to end, as a user runs it: the run directory, the summary's keys and
formats, the report, bad flags, and no process left behind on SIGINT or SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinyps
from tinyps.cli import main

SUMMARY_KEYS = {
    "mode", "servers", "workers", "staleness_bound", "precision", "dataset", "optimizer",
    "epochs", "steps_per_worker", "wall_s", "samples_per_s", "test_accuracy", "test_loss",
    "final_train_loss", "staleness_mean", "staleness_max", "wait_fraction", "dropped_stale",
    "updates_applied", "bytes_pushed", "bytes_pulled", "restarts", "per_server", "placement",
}
METRIC_KEYS = {"time", "worker", "step", "loss", "staleness", "samples", "wait_s", "blocked_s",
               "wire_s"}
HELD_OUT_KEYS = {"test_accuracy", "test_loss", "eval_s"}


def _tinyps(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyps", *args], capture_output=True,
                          text=True, timeout=240, **kwargs)


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid`, read from /proc."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == pid:
            out.append(int(status.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its entry remains


def test_launch_as_a_user_runs_it(tmp_path):
    run_dir = tmp_path / "run"
    done = _tinyps("launch", "--servers", "2", "--workers", "2", "--mode", "ssp",
                   "--staleness", "2", "--steps", "40", "--hidden", "32,16",
                   "--split-bytes", "4000", "--lr-schedule", "warmup:5,cosine",
                   "--run-dir", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # --json: standard output is one JSON document
    assert set(summary) >= SUMMARY_KEYS
    assert summary["lr_schedule"] == "warmup:5,cosine" and summary["lr"] == 0.1
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert (summary["mode"], summary["servers"], summary["workers"]) == ("ssp", 2, 2)
    assert summary["staleness_bound"] == 2 and summary["steps_per_worker"] == 40
    assert isinstance(summary["wait_fraction"], list) and len(summary["wait_fraction"]) == 2
    assert all(0 <= f <= 1 for f in summary["wait_fraction"])
    assert summary["restarts"] == 0 and summary["precision"] == "fp32"
    # dense0.weight (64x32 float32, 8 KiB) is split; the rest are whole.
    split = summary["placement"]["dense0.weight"]
    assert [part["server"] for part in split] == [0, 1]
    assert split[0]["rows"][0] == 0 and split[-1]["rows"][1] == 64
    assert isinstance(summary["placement"]["dense2.bias"], int)
    servers = summary["per_server"]
    assert [s["index"] for s in servers] == [0, 1]
    assert all(isinstance(s["tensors"], list) for s in servers)
    assert sum(s["params"] for s in servers) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert summary["bytes_pushed"] == sum(s["bytes_in"] for s in servers) > 0
    # the printed placement table and summary, beside the JSON: on standard error
    assert "dense0.weight" in done.stderr and "test accuracy" in done.stderr
    # No empty progress bar ("ssp: 0step [00:00, ?step/s]") before the real one; a rate such
    # as "522.40step/s" is not one.
    assert not re.search(r"(^|\s)0step\b", done.stderr)
    assert "test acc" in done.stderr  # the bar shows the latest held-out accuracy
    assert "compute / wire / blocked" in done.stderr
    # Each worker's time, split: the shares of compute, wire, blocked and evaluation add up.
    split = summary["time_split"]
    assert [s["worker"] for s in split] == [0, 1]
    for s in split:
        shares = [s[f"{k}_share"] for k in ("compute", "wire", "blocked", "eval")]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    assert split[0]["eval_s"] > 0 and split[1]["eval_s"] == 0  # worker 0 alone evaluates

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 40
    assert all(set(r) >= METRIC_KEYS for r in records)
    assert sorted((r["worker"], r["step"]) for r in records) == [
        (w, s) for w in range(2) for s in range(40)]
    assert all(r["time"] >= 0 for r in records)
    assert all(r["wait_s"] == pytest.approx(r["blocked_s"] + r["wire_s"]) for r in records)
    # Held-out figures on worker 0's evaluated lines (the first, once per epoch of its shard,
    # the last), left out of every other line.
    measured = [r for r in records if "test_accuracy" in r]
    assert {r["worker"] for r in measured} == {0}
    steps = sorted(r["step"] for r in measured)
    assert steps[0] == 0 and steps[-1] == 39 and len(steps) >= 3
    assert all(set(r) >= HELD_OUT_KEYS and 0 <= r["test_accuracy"] <= 1 for r in measured)
    assert all(set(r).isdisjoint(HELD_OUT_KEYS) for r in records if r not in measured)
    curve = tinyps.RunResult(summary, run_dir).test_curve  # the Python API's view of it
    assert [p["step"] for p in curve] == steps
    # Its time axis is training time: from 0 at the start line, growing, evaluations out.
    times = [p["train_s"] for p in curve]
    assert 0 <= times[0] < times[-1] and times == sorted(times)
    assert times[-1] <= summary["train_s"] - sum(p["eval_s"] for p in curve[:-1]) + 1e-9
    assert json.loads((run_dir / "config.json").read_text())["staleness"] == 2
    for name in ("server0", "server1", "worker0", "worker1"):
        assert (run_dir / "logs" / f"{name}.log").exists()
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "workers must be >= 1, got 0"),
        (["--mode", "bsp"], "invalid choice"),
        (["--slow-worker", "3:2"], "slow worker 3 is not one of workers 0..1"),
        (["--slow-worker", "1"], "expected WORKER:FACTOR"),
        (["--placement", "dense7=0"], "unknown layer 'dense7'"),
        (["--mode", "sync", "--staleness", "2"], "for --mode ssp"),
        (["--hidden", "0"], "hidden widths must be >= 1"),
        (["--lr-schedule", "cosine:0"], "--lr-schedule 'cosine:0': cosine's T_MAX must be >= 1"),
        # async: 2 workers x 5 steps make 10 updates of each key
        (["--mode", "async", "--steps", "5", "--lr-schedule", "warmup:10,cosine"],
         "a warmup of 10 updates is not shorter than the run's 10 updates per key"),
    ],
)
def test_bad_flags_fail_before_any_process_starts(tmp_path, args, message):
    run_dir = tmp_path / "never"
    done = _tinyps("launch", "--run-dir", str(run_dir), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_launcher_leaves_no_process_behind(tmp_path, sig):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tinyps", "launch", "--steps", "100000", "--run-dir",
         str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics" / "worker1.jsonl"
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)  # polling for a file, with a deadline
        children = _children(launcher.pid)
        assert len(children) == 4  # 2 servers, 2 workers
        launcher.send_signal(sig)
        try:
            code = launcher.wait(60)
        except subprocess.TimeoutExpired:  # say where it is stuck: every thread's stack
            launcher.send_signal(signal.SIGUSR1)
            launcher.kill()
            raise AssertionError("the launcher did not end; its stderr ends:\n"
                                 + launcher.communicate(timeout=10)[1][-20000:]) from None
        assert code == 130
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in _children(launcher.pid):
            os.kill(pid, signal.SIGKILL)


def test_status_once_and_the_python_cluster(tmp_path, capsys):
    with tinyps.cluster(servers=2, workers=1, mode="async", run_dir=str(tmp_path)) as c:
        client = c.client()
        client.init({"dense0.weight": np.ones((4, 2), np.float32),
                     "dense0.bias": np.zeros(2, np.float32)}, "sgd", lr=0.5)
        client.push({"dense0.weight": np.ones((4, 2), np.float32),
                     "dense0.bias": np.ones(2, np.float32)}, 0)
        np.testing.assert_array_equal(client.pull()["dense0.bias"], -0.5)
        assert main(["status", "--once", *c.addresses]) == 0
        table = capsys.readouterr().out
        for address in c.addresses:
            assert address in table
        assert "worker clocks (steps pushed): 0: 1" in table
        children = [child.proc for child in c._children]
    assert all(p.poll() is not None for p in children)


def test_placement_command_prints_the_table(capsys):
    assert main(["placement", "--servers", "3", "--hidden", "128,64",
                 "--placement", "dense0=2,dense1=0,dense2=1"]) == 0
    out = capsys.readouterr().out
    assert "dense0.weight  64x128  32,768  2" in out
    assert "strategy dense0=2,dense1=0,dense2=1" in out


def test_a_server_on_a_taken_port_fails_with_a_clear_error(capsys):
    from ps.server import serve

    running = serve(mode="sync", workers=1)
    try:
        assert main(["server", "--port", str(running.port)]) == 2
        assert f"cannot bind 127.0.0.1:{running.port}" in capsys.readouterr().err
    finally:
        running.stop(0)


def test_a_cluster_can_reuse_its_run_directory(tmp_path):
    # A notebook run twice starts its cluster in the same folder twice.
    for _ in range(2):
        with tinyps.cluster(servers=1, workers=1, run_dir=str(tmp_path / "c")) as c:
            assert c.addresses


def test_drawing_a_report_leaves_the_plotting_backend_alone(tmp_path):
    import matplotlib

    from tinyps.report import write_report

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # as a notebook sets its inline backend
    summary = {"mode": "sync", "staleness_bound": 0, "servers": 1, "workers": 1,
               "test_accuracy": 0.5, "staleness_histogram": [3], "staleness_mean": 0.0,
               "staleness_max": 0, "per_server": [{"index": 0, "bytes_in": 10, "bytes_out": 20,
                                                   "updates": 3}]}
    records = [{"worker": 0, "step": s, "time": s + 6.0, "pulled": s + 5.5, "loss": 1.0 / (s + 1),
                "wait_s": 0.1, "compute_s": 0.2} for s in range(3)]
    try:
        path = write_report(records, summary, tmp_path / "report.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    # The loss axis starts at the launch, with the start-up before the first step shaded.
    from tinyps.report import draw_report

    loss = draw_report(records, summary).axes[0]
    assert loss.get_xlim()[0] == 0
    assert [t.get_text() for t in loss.get_legend().get_texts()][0] == "start-up (5.5 s)"
