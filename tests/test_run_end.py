"""How a launch ends, and what it says: exit codes, a Ctrl-C that writes what the run has, a
frozen server found and restarted, a run directory that cannot be written, a server slow to
stop. Cheap checks of the parts first; real launches (marked slow) after them.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.server import serve
from ps.snapshot import KeyState, Snapshot
from tinyps.cli import build_parser
from tinyps.cli.flags import settings_from
from tinyps.config import LaunchConfig
from tinyps.health import HealthWatch
from tinyps.local_backend import LocalBackend
from tinyps.outcome import outcome, resume_command
from tinyps.plan import LaunchError, LaunchPlan, model_placement
from tinyps.processes import Child
from tinyps.summary import _diverged, format_summary
from tinyps.supervisor import Backend, Supervisor, resumed_step
from worker.data import load_dataset
from worker.model import MLP

ROOT = Path(__file__).resolve().parent.parent


# -- what a summary means ------------------------------------------------------------------

@pytest.mark.parametrize(("summary", "code", "says"), [
    ({"workers_lost": [], "diverged": False}, 0, "trained as asked"),
    ({"workers_lost": [2], "diverged": False}, 3,
     "lost worker2 for good (no restarts left): the others finished the run"),
    ({"workers_lost": [], "diverged": True, "diverged_reason": "why"}, 4,
     "the model diverged: why"),
    ({"workers_lost": [0, 1], "diverged": True, "diverged_reason": "why"}, 3,
     "lost worker0, worker1 for good (no restarts left): the others finished the run; the "
     "model diverged: why"),
    ({"interrupted": True, "steps_done": 7, "steps_this_launch": 10, "workers": 2}, 130,
     "interrupted after 7 steps of 10 per worker x 2 workers"),
])
def test_the_exit_code_and_message_say_what_happened(summary, code, says):
    assert outcome(summary) == (code, says)


def _losses(losses: list[float], worker: int = 0) -> list[dict]:
    return [{"worker": worker, "step": i, "loss": x} for i, x in enumerate(losses)]


@pytest.mark.parametrize(("test_loss", "losses", "why"), [
    (0.5, [2.0] * 10 + [1.0] * 10, None),  # trained
    (math.nan, [2.0] * 10 + [1.0] * 10, "the final model's test loss is nan"),
    (math.inf, [2.0] * 20, "the final model's test loss is inf"),
    (0.5, [2.0] * 19 + [math.nan], "worker0's training loss was nan at step 19"),
    (0.5, [2.0, math.inf] + [1.0] * 20, None),  # an early overflow, skipped: not divergence
    (0.5, [1.0] * 10 + [3.0] * 10, "the training loss grew from 1.0000"),
    (None, [1.0] * 10 + [3.0] * 10, "the training loss grew"),  # no model, records only
    (None, [], None),
])
def test_diverged_is_defined_precisely(test_loss, losses, why):
    got = _diverged(test_loss, {0: _losses(losses)} if losses else {})
    assert (got is None) == (why is None), got
    if why is not None:
        assert got.startswith(why), got


def test_a_summary_without_test_figures_still_prints():
    # A resume with nothing left crashed here (TypeError on None); an interrupted run whose
    # servers did not answer has no model to evaluate.
    summary = {"staleness_bound": 0, "mode": "sync", "wait_fraction": [], "servers": 2,
               "workers": 2, "steps_per_worker": 10, "dataset": "digits", "test_accuracy": None,
               "test_loss": None, "final_train_loss": None, "samples_per_s": 0.0,
               "train_s": 0.0, "wall_s": 1.0, "staleness_mean": 0.0, "staleness_max": 0,
               "updates_applied": 0, "bytes_pushed": 0, "bytes_pulled": 0, "fault_events": [],
               "diverged": False, "suspect_workers": [], "interrupted": True, "steps_done": 0,
               "steps_this_launch": 10, "interrupt_notes": ["no model"],
               "resumed_from": {"run": "runs/a", "step": 5}}
    text = format_summary(summary, "runs/b")
    assert "test accuracy n/a, test loss n/a, final train loss n/a" in text
    assert "INTERRUPTED after 0 of 10 x 2 steps: no model" in text
    assert "resumed from runs/a at step 5: 10 steps each in this launch" in text


@pytest.mark.parametrize("settings", [
    {},
    {"mode": "async", "workers": 3, "hidden": (32, 16), "slow_worker": (0, 5.0),
     "lr_schedule": "warmup:10,step:100:0.5"},
    {"mode": "ssp", "staleness": 2, "fused": False, "lr": 0.05, "epochs": 3},
])
def test_the_resume_command_repeats_the_settings_that_matter(settings, tmp_path):
    config = LaunchConfig.from_flat({**settings, "kill_server": (0, 5), "run_dir": "runs/x",
                                     "max_restarts": 1})
    command = resume_command(config, tmp_path)
    assert command.startswith(f"tinyps launch --resume {tmp_path}")
    assert "--kill-server" not in command and "--run-dir" not in command  # not repeated
    args = build_parser().parse_args(command.split()[1:])
    again = LaunchConfig.from_flat(settings_from(args, LaunchConfig))
    assert again.resume == str(tmp_path)
    assert again.replace(resume=None, kill_server=(0, 5), run_dir="runs/x") == config


def _server_at(clocks: list[int], version: int) -> Snapshot:
    """A one-key shard whose two workers have pushed `clocks` steps, at `version`."""
    key = Key("w", (4,), 0, 4)
    state = KeyState(key, np.zeros(4, np.float32), version, np.array(clocks, np.int64), {})
    return Snapshot("sync", 2, OptimizerConfig(), [state], {}, seq=version)


@pytest.mark.parametrize(("mode", "servers", "step"), [
    ("async", [([34, 36], 70), ([35, 35], 70)], 35),  # the furthest server: the other skips
    ("sync", [([34, 34], 35), ([34, 34], 34)], 35),   # a step applied without them counts
    ("sync", [([3, 3], 3)], 3),
    ("async", [], 0),
])
def test_a_resumed_run_counts_from_where_its_workers_start(mode, servers, step):
    # As PSClient.start_step finds it: each server's start, the furthest of them. The
    # launcher counting from the slowest server thought a Ctrl-C'd run 2 steps short.
    assert resumed_step([_server_at(c, v) for c, v in servers], mode) == step


# -- the parts that notice faults ----------------------------------------------------------

def test_a_growing_checkpoint_failure_count_is_an_event_once_per_growth():
    watch = HealthWatch(["127.0.0.1:1", "127.0.0.1:2"])
    watch.check_stats(0, {})  # a server without the fields: nothing to say
    watch.check_stats(1, {"checkpoint_failures": 0, "checkpoint_error": ""})
    assert watch.take_events() == []
    watch.check_stats(1, {"checkpoint_failures": 1,
                          "checkpoint_error": "[Errno 28] No space left on device"})
    watch.check_stats(1, {"checkpoint_failures": 1, "checkpoint_error": "same one"})
    watch.check_stats(0, {"checkpoint_failures": 3, "checkpoint_error": "EIO"})
    assert watch.take_events() == [
        "server1: checkpoint write failed (1 in all): [Errno 28] No space left on device",
        "server0: checkpoint write failed (3 in all): EIO"]
    assert watch.take_events() == []


def test_the_health_watch_sees_a_server_that_does_not_answer():
    running = serve()
    watch = HealthWatch([running.address, "127.0.0.1:9"], every_s=0.05, deadline_s=0.2)
    watch.start()
    try:
        deadline = time.monotonic() + 20
        while watch.silent_for()[1] < 1.0:  # nothing listens on port 9
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling the watch, with a deadline
        assert watch.silent_for()[0] < 1.0  # the live server keeps answering
        watch.reset(1)
        assert watch.silent_for()[1] < 1.0
    finally:
        watch.close()
        running.stop(0)


def _plan(tmp_path: Path, **settings) -> LaunchPlan:
    config = LaunchConfig.from_flat({"servers": 1, "workers": 1, "steps": 5, "hidden": (8,),
                                     "run_dir": str(tmp_path), **settings})
    data = load_dataset("digits", seed=0)
    return LaunchPlan(config, tmp_path, data, model_placement(config, data), 5,
                      [len(data.X_train)], tmp_path / "checkpoints", None, time.time())


class _SlowToStop(Backend):
    """A backend whose one server is in this process and never reports stopped."""

    def __init__(self, address: str) -> None:
        self.address, self.closed = address, False

    def start_servers(self, restore):
        return [self.address]

    def start_worker(self, index):
        pass

    def poll(self, running):
        return [], []

    def server_restarts(self):
        return 0

    def end_frozen_server(self, index):
        pass

    def kill(self, kind, index, done):
        return None

    def end_worker(self, index):
        pass

    def wait_servers_stopped(self, timeout):
        return [0]

    def checkpoints_written(self):
        return 0

    def close(self, grace_s=5.0):
        self.closed = True


def test_a_server_that_does_not_stop_in_time_is_a_fault_event(tmp_path):
    plan = _plan(tmp_path)
    running = serve(workers=1)
    try:
        data = plan.data
        params = MLP((data.n_features, 8, data.n_classes), seed=0).init_params()
        from ps.client import PSClient

        with PSClient([running.address]) as client:
            client.init(params, "sgd", lr=0.1)
        supervisor = Supervisor(plan, _SlowToStop(running.address))
        supervisor.start()
        summary, got = supervisor.finish([])
    finally:
        running.stop(0)
    # (The manifest then says the final checkpoint is missing: this server writes none.)
    assert summary["fault_events"][0] == (
        "server0 did not stop within 60 s of the Shutdown call: ended (its final checkpoint "
        "may be missing)")
    assert set(got) == set(params)


def test_the_local_backend_reports_a_server_still_running_after_shutdown(tmp_path):
    backend = LocalBackend(_plan(tmp_path))
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    backend.servers = [Child("server0", stuck, tmp_path / "server0.log")]
    try:
        assert backend.wait_servers_stopped(0.2) == [0]  # main raised TimeoutExpired here
    finally:
        backend.close(0.0)
    assert stuck.poll() is not None


def test_an_unwritable_run_directory_is_named_not_a_traceback(tmp_path):
    from tinyps.launcher import _write

    plan = _plan(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").mkdir()  # a directory where the file must go
    with pytest.raises(LaunchError) as err:
        _write(plan, [], {"test_accuracy": None}, None)
    assert f"cannot write the run's results to the run directory {tmp_path / 'run'}" in str(
        err.value)


# -- real launches -------------------------------------------------------------------------

def _launcher(run_dir: Path, *args: str) -> subprocess.Popen:
    """`tinyps launch` in a session of its own, as a terminal runs it: a Ctrl-C there goes to
    its whole process group (os.killpg)."""
    return subprocess.Popen([sys.executable, "-m", "tinyps", "launch", "--run-dir",
                             str(run_dir), "--hidden", "16", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                ppid = next(line for line in status.read_text().splitlines()
                            if line.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if int(ppid.split()[1]) == parent:
                out.append(int(status.parent.name))
                todo.append(int(status.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _wait_for(condition, proc: subprocess.Popen, what: str, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the launcher ended before {what}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"not in {deadline_s} s: {what}"
        time.sleep(0.05)  # polling files the run writes, with a deadline


def _records(run_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (run_dir / "metrics").glob("*.jsonl"))


def _end(proc: subprocess.Popen, children: list[int]) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    return proc.communicate(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_writes_what_the_run_has_and_says_how_to_resume(tmp_path, presses):
    run_dir = tmp_path / "run"
    proc = _launcher(run_dir, "--steps", "100000", "--checkpoint-every", "20")
    children: list[int] = []
    try:
        _wait_for(lambda: _records(run_dir) >= 40, proc, "training went on")
        children = _descendants(proc.pid)
        assert len(children) >= 4  # 2 servers, 2 workers
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole group
        if presses == 2:  # pressed again while it cleans up: cut short, never a hang
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)  # the salvage has begun (it takes seconds): press again
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    finally:
        out, err = _end(proc, children)
    assert code == 130, err
    assert not [pid for pid in children if _alive(pid)]  # no orphans
    assert not list(run_dir.glob("*.address"))
    assert "Traceback" not in err, err
    if presses == 1:  # the whole cleanup ran
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["interrupted"] is True and summary["steps_done"] >= 40
        assert summary["steps_this_launch"] == 100000
        assert (run_dir / "model.npz").exists() and summary["test_accuracy"] is not None
        command = (f"tinyps launch --resume {run_dir} --hidden 16 --steps 100000 "
                   f"--checkpoint-every 20")
        assert f"To go on from the servers' checkpoints: {command}" in err, err
        assert summary["resume_command"] == command
        assert "INTERRUPTED after" in out
        _resume_goes_on_from(run_dir, tmp_path)


def _resume_goes_on_from(source: Path, tmp_path: Path) -> None:
    """The printed command's run resumes where the Ctrl-C left it: asked for too few steps it
    says how many the checkpoints hold; asked for 10 more it makes exactly those."""
    def resume(steps: int, run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tinyps", "launch", "--resume",
                               str(source), "--hidden", "16", "--steps", str(steps),
                               "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True,
                              text=True, timeout=240)

    refused = resume(1, tmp_path / "never")
    assert refused.returncode == 2, refused.stderr
    assert not (tmp_path / "never").exists()
    held = int(refused.stderr.split(" holds ")[1].split()[0])
    assert "asks for 1 (--steps 1): nothing left to train" in refused.stderr
    assert held >= 20  # the final checkpoints written at the Ctrl-C
    done = resume(held + 10, tmp_path / "resumed")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["resumed_from"] == {"run": str(source), "step": held}
    assert summary["steps_this_launch"] == 10 and summary["steps_done"] == 20
    assert summary["updates_applied"] == held + 10


@pytest.mark.slow
def test_a_frozen_server_is_killed_and_restarted_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launcher(run_dir, "--steps", "600", "--checkpoint-every", "10",
                     "--freeze-timeout-s", "3", "--json")
    children: list[int] = []
    try:
        _wait_for(lambda: _records(run_dir) >= 20, proc, "training went on")
        children = _descendants(proc.pid)
        address = (run_dir / "server1.address").read_text().strip()
        server = next(pid for pid in children
                      if "server1.address" in Path(f"/proc/{pid}/cmdline").read_text())
        os.kill(server, signal.SIGSTOP)  # frozen: alive, but answering nothing
        code = proc.wait(120)
    finally:
        out, err = _end(proc, children)
    assert code == 0, err
    assert not _alive(server)
    summary = json.loads(out.strip().splitlines()[-1])
    frozen = [e for e in summary["fault_events"] if e.startswith("server1 did not answer")]
    assert len(frozen) == 1, summary["fault_events"]
    assert "its health check for 3 s: frozen; killed and restarted from its checkpoint" in \
        frozen[0] or "frozen; killed and restarted from its checkpoint" in frozen[0]
    assert summary["restarts"] == 1 and summary["updates_applied"] == 600
    assert summary["per_server"][1]["address"] == address  # the same address
    assert "server1 did not answer its health check" in err  # told live, above the bar


@pytest.mark.slow
def test_a_diverged_run_exits_4_and_says_why(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tinyps", "launch", "--run-dir",
                           str(run_dir), "--steps", "60", "--hidden", "16", "--lr", "1e4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 4, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged"] and summary["diverged_reason"]
    assert f"tinyps launch: the model diverged: {summary['diverged_reason']} (exit code 4)" \
        in done.stderr
    assert (run_dir / "model.npz").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB filesystem of its own (tmpfs), unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_a_run_directory_that_fills_up_is_named_and_the_launcher_exits_1(tiny_disk):
    run_dir = tiny_disk / "run"
    done = subprocess.run([sys.executable, "-m", "tinyps", "launch", "--run-dir",
                           str(run_dir), "--steps", "100000", "--hidden", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr
    assert f"the run directory {run_dir} cannot be written (No space left on device)" in \
        done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    np.testing.assert_equal(list(run_dir.glob("*.address")), [])


def test_status_shows_a_frozen_server_as_not_answering_and_the_others(tmp_path, capsys):
    from tinyps.cli import main

    ready = tmp_path / "server.address"
    frozen = subprocess.Popen([sys.executable, "-m", "tinyps", "server", "--ready-file",
                               str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    live = serve()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert frozen.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polling the ready file, with a deadline
        address = ready.read_text().strip()
        os.kill(frozen.pid, signal.SIGSTOP)
        started = time.monotonic()
        code = main(["status", "--once", live.address, address])
        took = time.monotonic() - started
    finally:
        frozen.kill()
        frozen.wait(10)
        live.stop(0)
    out = capsys.readouterr().out
    assert code == 1
    rows = out.splitlines()
    assert rows[2].startswith(f"0       {live.address}") and "sync" in rows[2]
    assert rows[3].startswith(f"1       {address}  NOT ANSWERING: ")
    assert rows[3].endswith("within 3 s (frozen, overloaded or down?)")
    assert took < 20  # a deadline, not a hang


@pytest.mark.slow
def test_checkpoints_on_a_full_disk_are_fault_events_and_the_results_are_written(tiny_disk,
                                                                                tmp_path):
    (tiny_disk / "filler").write_bytes(b"\0" * (512 * 1024 - 4096))  # the disk is full
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tinyps", "launch", "--run-dir",
                           str(run_dir), "--checkpoint-dir", str(tiny_disk / "ck"), "--steps",
                           "300", "--hidden", "16", "--checkpoint-every", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    failed = [e for e in summary["fault_events"] if "checkpoint write failed" in e]
    assert failed and all(e.startswith(("server0: ", "server1: ")) for e in failed), \
        summary["fault_events"]
    assert "No space left on device" in failed[0]
    assert failed[0] in done.stderr  # told as it happened
    assert (run_dir / "model.npz").exists() and summary["updates_applied"] == 300


@pytest.mark.slow
def test_the_python_api_raises_launch_interrupted_after_writing_what_it_had(tmp_path):
    import threading

    import tinyps

    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics" / "worker0.jsonl"

    def press_ctrl_c() -> None:  # as Jupyter's interrupt does: SIGINT to this process
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 2000):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)  # polling the run's file, with a deadline
        os.kill(os.getpid(), signal.SIGINT)

    # Jupyter handles SIGINT itself; a test run from a script's background inherits it
    # ignored, and then the press would do nothing: install Python's own handler, as a kernel
    # has one, for this test only.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(tinyps.LaunchInterrupted) as stop:
            tinyps.launch(run_dir=str(run_dir), steps=20000, hidden=(16,))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert stop.value.run_dir == run_dir and stop.value.summary["interrupted"] is True
    assert "To go on from the servers' checkpoints: tinyps launch --resume" in str(stop.value)
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] is True
    assert (run_dir / "model.npz").exists() and not list(run_dir.glob("*.address"))


def test_a_read_only_run_directory_is_named_before_anything_starts(tiny_disk):
    done = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    run_dir = tiny_disk / "run"
    done = subprocess.run([sys.executable, "-m", "tinyps", "launch", "--run-dir",
                           str(run_dir), "--steps", "5"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    # The message alone: no placement table, no empty progress bar before it.
    assert done.stderr == (f"tinyps launch: cannot write the run directory {run_dir}: Read-only "
                           f"file system ({run_dir}); choose another --run-dir\n"), done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
