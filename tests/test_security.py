"""Tokens and TLS: the tinyps service refuses calls without the token (health stays open),
serves over TLS, and under mutual TLS refuses clients without a certificate."""

import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from certs import issue, make_ca
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.client import PSClient, PSError, wait_healthy
from ps.security import TLSFiles
from ps.server import serve

PARAMS = {"w": np.ones(4, np.float32)}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    make_ca(d)
    for name in ("server", "client"):
        issue(d, name, ["IP:127.0.0.1", "DNS:localhost"])
    return d


def test_calls_without_the_token_are_unauthenticated_and_health_stays_open():
    running = serve(mode="async", workers=1, token="s3cret")
    try:
        for token in (None, "wrong"):
            with PSClient([running.address], token=token) as client:
                with pytest.raises(PSError, match="UNAUTHENTICATED") as err:
                    client.init(PARAMS, "sgd", lr=1.0)
                assert "s3cret" not in str(err.value)  # never echoed back
        with PSClient([running.address], token="s3cret") as client:
            client.init(PARAMS, "sgd", lr=1.0)
            np.testing.assert_array_equal(client.pull()["w"], 1.0)
        assert wait_healthy([running.address], timeout=10) == []  # no token needed
    finally:
        running.stop(0)


def test_tls_serves_clients_that_trust_the_ca(certs):
    running = serve(mode="async", workers=1, tls_cert=str(certs / "server.pem"),
                    tls_key=str(certs / "server.key"))
    try:
        trusting = TLSFiles(ca=certs / "ca.pem")
        # Asked for TLS, every tensor stays on the encrypted channel: no shared memory.
        with PSClient([running.address], tls=trusting, shared_memory=True) as client:
            client.init(PARAMS, "sgd", lr=1.0)
            np.testing.assert_array_equal(client.pull()["w"], 1.0)
            assert client.shared_memory is False and client._mailboxes == {}
        assert running.local is None  # nor a local channel beside the encrypted one
        assert wait_healthy([running.address], timeout=10, tls=trusting) == []
        with PSClient([running.address], retry_s=0.5, deadline_s=5) as plain, \
                pytest.raises(PSError, match="UNAVAILABLE") as refused:
            plain.pull()
        assert "if it speaks TLS, give this client its CA, e.g. --tls-ca" in str(refused.value)
    finally:
        running.stop(0)


def test_a_tls_client_of_a_plaintext_server_is_told_what_failed(certs):
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address], tls=TLSFiles(ca=certs / "ca.pem"), retry_s=0.5,
                      deadline_s=5) as client, pytest.raises(PSError, match="UNAVAILABLE") as err:
            client.stats()
        assert "the TLS handshake failed: does the server speak TLS" in str(err.value)
    finally:
        running.stop(0)


def test_mutual_tls_refuses_a_client_without_a_certificate(certs):
    running = serve(mode="async", workers=1, tls_cert=str(certs / "server.pem"),
                    tls_key=str(certs / "server.key"), tls_ca=str(certs / "ca.pem"))
    try:
        anonymous = TLSFiles(ca=certs / "ca.pem")
        with PSClient([running.address], tls=anonymous, retry_s=0.5, deadline_s=5) as client, \
                pytest.raises(PSError, match="UNAVAILABLE"):
            client.init(PARAMS, "sgd", lr=1.0)
        known = TLSFiles(cert=certs / "client.pem", key=certs / "client.key",
                         ca=certs / "ca.pem")
        with PSClient([running.address], tls=known) as client:
            client.init(PARAMS, "sgd", lr=1.0)
            assert client.versions()[0]["initialised"]
    finally:
        running.stop(0)


def test_bad_tls_settings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="TLS cert file"):
        TLSFiles(cert=tmp_path / "missing.pem", key=tmp_path / "missing.key")
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ValueError, match="both a certificate and its key"):
        TLSFiles(cert=tmp_path / "c.pem")


def test_health_answers_over_tls_without_a_token(certs):
    running = serve(mode="async", workers=1, tls_cert=str(certs / "server.pem"),
                    tls_key=str(certs / "server.key"), token="s3cret")
    try:
        creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
        with grpc.secure_channel(running.address, creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_a_launched_cluster_runs_on_mutual_tls_with_a_token(certs, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "tinyps", "launch", "--servers", "1", "--workers", "2",
         "--steps", "20", "--tls-cert", str(certs / "server.pem"),
         "--tls-key", str(certs / "server.key"), "--tls-ca", str(certs / "ca.pem"),
         "--run-dir", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=240,
        env=dict(os.environ, TINYPS_TOKEN="launch-s3cret"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps_per_worker"] == 20
    saved = (run_dir / "config.json").read_text()
    assert "launch-s3cret" not in saved and json.loads(saved)["tls_ca"].endswith("ca.pem")
    for log in (run_dir / "logs").iterdir():
        assert "launch-s3cret" not in log.read_text()
    assert ("tinyps server: sync for 2 workers on 127.0.0.1:" in
            (line := (run_dir / "logs" / "server0.log").read_text().splitlines()[0]))
    assert line.endswith(", mutual TLS (client certificates signed by its CA), token required")


@pytest.mark.parametrize("settings, guarded", [
    ({}, "plaintext, no token"),
    ({"token": "s3cret"}, "plaintext, token required"),
    ({"tls_cert": "server.pem", "tls_key": "server.key"}, "TLS, no token"),
    ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_ca": "ca.pem", "token": "s3cret"},
     "mutual TLS (client certificates signed by its CA), token required"),
])
def test_a_servers_log_line_says_how_it_is_guarded(certs, settings, guarded):
    from ps.server import ServerConfig
    from ps.settings import from_flat
    from tinyps.cli.process import serving_line

    files = {k: (str(certs / v) if k.startswith("tls") else v) for k, v in settings.items()}
    config = from_flat(ServerConfig, {"workers": 1, **files}, where="test")
    line = serving_line(config, "127.0.0.1:5")
    assert line == f"tinyps server: sync for 1 worker on 127.0.0.1:5, {guarded}"
    assert "s3cret" not in line
