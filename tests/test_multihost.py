"""A cluster spec run as a user of several hosts would: servers on distinct loopback
addresses (127.0.0.2, 127.0.0.3), each process started on its own from the same spec file,
over mutual TLS with a token; and the spec's refusals."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from certs import issue, make_ca

from tinyps import roles
from tinyps.spec import ClusterSpec

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3")
DEADLINE_S = 120.0
TOKEN = "spec-s3cret"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and one certificate for the cluster, valid for both server hosts."""
    d = tmp_path_factory.mktemp("certs")
    make_ca(d)
    issue(d, "node", [f"IP:{h}" for h in HOSTS])
    return d


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "tinyps", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT,
                                env=dict(os.environ, TINYPS_TOKEN=TOKEN))


def _wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert proc.poll() is None, f"exited early: {log.read_text()}"
        assert time.monotonic() < deadline, f"not ready in time: {log.read_text()}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.05)  # polls the ready file with a deadline; returns early if it dies


def test_a_spec_cluster_on_two_loopback_hosts_with_tls_and_a_token(certs, tmp_path):
    spec = {"servers": [f"{h}:{_free_port(h)}" for h in HOSTS], "workers": 2, "mode": "sync",
            "steps": 60, "seed": 0, "tls_cert": str(certs / "node.pem"),
            "tls_key": str(certs / "node.key"), "tls_ca": str(certs / "ca.pem")}
    spec_file = tmp_path / "cluster.json"
    spec_file.write_text(json.dumps(spec))
    procs = []
    try:
        for i in range(2):
            ready = tmp_path / f"server{i}.address"
            log = tmp_path / f"server{i}.log"
            procs.append(_start(["server", "--cluster", str(spec_file), "--index", str(i),
                                 "--ready-file", str(ready)], log))
            _wait_for(ready, procs[-1], log)
            assert ready.read_text().strip() == spec["servers"][i]  # exactly its address
        worker1 = _start(["worker", "--cluster", str(spec_file), "--index", "1"],
                         tmp_path / "worker1.log")
        procs.append(worker1)
        run_dir = tmp_path / "run"
        worker0 = subprocess.run(
            [sys.executable, "-m", "tinyps", "worker", "--cluster", str(spec_file), "--index",
             "0", "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
            timeout=DEADLINE_S, env=dict(os.environ, TINYPS_TOKEN=TOKEN))
        assert worker0.returncode == 0, worker0.stderr
        assert worker1.wait(DEADLINE_S) == 0
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["cluster"] == spec["servers"]
        assert summary["updates_applied"] == 60 and summary["workers"] == 2
        assert summary["test_accuracy"] > 0.8
        assert [s["address"] for s in summary["per_server"]] == spec["servers"]
        assert all(s["bytes_in"] > 0 for s in summary["per_server"])  # both hosts worked
        saved = (run_dir / "config.json").read_text()
        assert TOKEN not in saved
        assert ClusterSpec.from_dict(json.loads(saved)).servers == tuple(spec["servers"])
        for proc in procs[:2]:  # the servers run until stopped on their hosts
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(DEADLINE_S) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_spec_gives_the_launchers_settings_and_never_writes_the_token():
    spec = ClusterSpec.from_dict({"servers": ["127.0.0.2:1", "127.0.0.3:2"], "workers": 3})
    settings = spec.worker_settings(2, token="t")
    assert settings == roles.worker_settings(spec.config.replace(token="t"), 2,
                                             ["127.0.0.2:1", "127.0.0.3:2"])
    assert (settings.servers, settings.index, settings.workers) == (
        ("127.0.0.2:1", "127.0.0.3:2"), 2, 3)
    assert settings.security.token == "t"
    assert "t" not in roles.to_json(settings).split('"')  # the JSON a process gets: no token


@pytest.mark.parametrize("spec, message", [
    ({"workers": 2}, '"servers" must be a list'),
    ({"servers": ["127.0.0.2"], "workers": 1}, "is not HOST:PORT"),
    ({"servers": ["h:1", "h:1"]}, "not distinct"),
    ({"servers": ["h:1"], "token": "x"}, "never goes in the spec"),
    ({"servers": ["h:1"], "wrokers": 2}, "unknown settings"),
    ({"servers": ["h:1"], "mode": "fast"}, "mode must be one of"),
])
def test_bad_specs_are_refused_with_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        ClusterSpec.from_dict(spec)


def test_an_index_outside_the_spec_is_refused(tmp_path, capsys):
    from tinyps.cli import main

    spec_file = tmp_path / "cluster.json"
    spec_file.write_text(json.dumps({"servers": ["127.0.0.2:1"], "workers": 2}))
    assert main(["server", "--cluster", str(spec_file), "--index", "1"]) == 2
    assert "--index 1: the spec has servers 0..0" in capsys.readouterr().err
    assert main(["worker", "--cluster", str(spec_file), "--index", "2"]) == 2
    assert "--index 2: the spec has workers 0..1" in capsys.readouterr().err
