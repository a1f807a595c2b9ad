"""Shared-memory mailboxes (ps/mailbox.py): the file and its checks, then tensors through them
against tensors in the messages on real servers: the same numbers, the same byte counts, a
fallback to bytes where the server cannot map the file, re-attaching after a restart, and the
refusals of requests that point outside."""

import os
import stat
import threading

import grpc
import numpy as np
import pytest

from ps import ps_pb2, ps_pb2_grpc
from ps.client import PSClient
from ps.codec import encode_push_request
from ps.mailbox import SHM_DIR, Mailbox, MailboxError, MailboxMissing
from ps.server import serve

PARAMS = {"a": np.arange(600, dtype=np.float32).reshape(200, 3) / 600,
          "b": np.linspace(-1, 1, 5, dtype=np.float32)}


def _ours() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("tinyps-")}


# -- the file ------------------------------------------------------------------------------


def test_a_mailbox_is_a_private_file_that_both_sides_map():
    before = _ours()
    mine = Mailbox.create(64)
    try:
        info = os.stat(SHM_DIR / mine.name)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 128
        theirs = Mailbox.open(mine.name, 64)
        mine.gradients(8, np.float32, 4)[:] = [1, 2, 3, 4]
        np.testing.assert_array_equal(theirs.gradients(8, np.float32, 4), [1, 2, 3, 4])
        theirs.weights(0, np.uint16, 3)[:] = [7, 8, 9]
        np.testing.assert_array_equal(mine.weights(0, np.uint16, 3), [7, 8, 9])
        assert mine.gradients(0, np.float32, 16)[:4].tolist() == [0, 0, 1, 2]  # halves apart
        mine.unlink()
        assert mine.name not in _ours()
        theirs.weights(60, np.uint8, 4)[:] = 5  # still mapped on both sides
        assert mine.weights(60, np.uint8, 4).tolist() == [5, 5, 5, 5]
        theirs.close()
    finally:
        mine.unlink()
        mine.close()
    assert _ours() == before


def test_opening_checks_the_name_the_size_and_the_bounds():
    mine = Mailbox.create(64)
    try:
        with pytest.raises(MailboxError, match="not tinyps-<32 hex digits>"):
            Mailbox.open("../etc/passwd", 64)
        with pytest.raises(MailboxError, match="holds 128 bytes, not 2 \\* 32"):
            Mailbox.open(mine.name, 32)
        with pytest.raises(MailboxError, match="size must be in"):
            Mailbox.open(mine.name, 0)
        with pytest.raises(MailboxMissing, match="another host"):
            Mailbox.open("tinyps-" + "0" * 32, 64)
        with pytest.raises(MailboxError, match=r"bytes \[60, 68\) are outside"):
            mine.gradients(60, np.float32, 2)
        with pytest.raises(MailboxError, match="outside"):
            mine.weights(-4, np.float32, 1)
    finally:
        mine.unlink()
        mine.close()


# -- on a server ---------------------------------------------------------------------------


def _train(address: str, shared: bool, wire_dtype: str, workers: int = 2) -> dict:
    """Two workers, sync: pushes, pulls and PushPulls; the weights each ends with."""
    clients = [PSClient([address], worker_id=w, shared_memory=shared, wire_dtype=wire_dtype)
               for w in range(workers)]
    clients[0].init(PARAMS, "sgd", lr=0.1, split_bytes=1000)  # "a" is cut into keys
    ends, errors = {}, []

    def work(w: int) -> None:
        try:
            client = clients[w]
            params = client.pull(0)
            for step in range(4):
                grads = {k: (np.sin(v) + w).astype(np.float32) for k, v in params.items()}
                if step % 2:
                    params = client.push_pull(grads, step).params
                else:
                    client.push(grads, step)
                    params = client.pull(step + 1)
            ends[w] = params
        except Exception as err:  # reported below, on the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(ends) == workers
    attached = [c._mailboxes.get(0) is not None for c in clients]
    stats = clients[0].stats()[0]
    for client in clients:
        client.close()
    return {"ends": ends, "attached": attached, "bytes": (stats["bytes_in"], stats["bytes_out"])}


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_tensors_through_mailboxes_are_the_tensors_of_the_messages(wire_dtype):
    before = _ours()
    results = {}
    for shared in (False, True):
        running = serve(mode="sync", workers=2)
        try:
            results[shared] = _train(running.address, shared, wire_dtype)
        finally:
            running.stop(0)
    assert results[True]["attached"] == [True, True]
    assert results[False]["attached"] == [False, False]
    for w in (0, 1):
        for name, value in results[False]["ends"][w].items():
            assert np.array_equal(results[True]["ends"][w][name], value)
    # The servers count tensor bytes whichever way they went: the counts differ only by the
    # few bytes of each message that say where the data is (a mailbox's name, offsets);
    # without the tensor bytes, the shared count would be a fraction of the other.
    for wire, shm in zip(results[False]["bytes"], results[True]["bytes"], strict=True):
        assert abs(wire - shm) < 0.05 * wire
    assert _ours() == before  # names removed once mapped: nothing is left in /dev/shm


def test_a_server_that_cannot_map_the_mailbox_gets_bytes(tmp_path, monkeypatch):
    # As a server on another host: the worker's file is not in the server's /dev/shm.
    real_create = Mailbox.create.__func__
    monkeypatch.setattr(Mailbox, "create", classmethod(
        lambda cls, size: real_create(cls, size, directory=tmp_path)))
    running = serve(mode="sync", workers=2)
    try:
        got = _train(running.address, shared=True, wire_dtype="float32")
    finally:
        running.stop(0)
    assert got["attached"] == [False, False]
    assert list(tmp_path.iterdir()) == []  # the refused mailboxes were removed
    reference = serve(mode="sync", workers=2)
    try:
        want = _train(reference.address, shared=False, wire_dtype="float32")
    finally:
        reference.stop(0)
    for name, value in want["ends"][0].items():
        assert np.array_equal(got["ends"][0][name], value)


def test_a_restarted_server_gets_a_new_mailbox():
    running = serve(mode="async", workers=1)
    port = running.port
    with PSClient([running.address], shared_memory=True) as client:
        client.init(PARAMS, "sgd", lr=0.5)
        client.push({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
        first = client.links[0].mailbox
        running.stop(0)
        running = serve(port=port, mode="async", workers=1)  # has lost every mailbox
        try:
            client.init(PARAMS, "sgd", lr=0.5)
            result = client.push_pull({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
            assert client.links[0].mailbox is not first
            for name, value in PARAMS.items():
                np.testing.assert_allclose(result.params[name], value - 0.5, rtol=1e-6)
        finally:
            running.stop(0)


@pytest.fixture
def attached():
    running = serve(mode="async", workers=2)
    with PSClient([running.address], shared_memory=True) as client:
        client.init(PARAMS, "sgd", lr=0.5)
        client.pull()
        assert client.links[0].mailbox is not None
        with grpc.insecure_channel(running.address) as channel:
            yield client, ps_pb2_grpc.ParameterServerStub(channel)
    running.stop(0)


def _refused(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code(), err.value.details()


def test_shared_requests_that_point_outside_are_refused_and_change_nothing(attached):
    client, stub = attached
    before = client.stats()[0]
    push = client.links[0].methods["Push"]
    mailbox = client.links[0].mailbox
    b = [("b", 0, np.ones(5, np.float32), 0)]
    refusals = [
        (encode_push_request(0, 0, b, offsets=[mailbox.size - 8], mailbox=mailbox.name),
         grpc.StatusCode.INVALID_ARGUMENT, "outside the mailbox"),
        # a skipped step carries no values, but its reply would still be written there
        (encode_push_request(0, 0, [("b", 0, np.zeros(0, np.float32), 0)], skip=True,
                             offsets=[mailbox.size - 8], mailbox=mailbox.name),
         grpc.StatusCode.INVALID_ARGUMENT, "outside the mailbox"),
        (encode_push_request(1, 0, b, offsets=[0], mailbox=mailbox.name),
         grpc.StatusCode.FAILED_PRECONDITION, "worker 1 has no mailbox"),
        # written for a mailbox the server no longer has (a newer Attach replaced it)
        (encode_push_request(0, 0, b, offsets=[0], mailbox="tinyps-" + "c" * 32),
         grpc.StatusCode.FAILED_PRECONDITION, "worker 0 has no mailbox tinyps-ccc"),
    ]
    for request, code, words in refusals:
        got_code, details = _refused(push, request)
        assert got_code == code and words in details, details
    pulls = [
        (ps_pb2.PullRequest(worker=0, step=-1, mailbox=mailbox.name,
                            keys=[ps_pb2.KeyRef(name="b", offset=mailbox.size - 4)]),
         "outside the mailbox"),
        (ps_pb2.PullRequest(worker=0, step=-1, mailbox=mailbox.name), "must name its keys"),
    ]
    for request, words in pulls:
        code, details = _refused(stub.Pull, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
    after = client.stats()[0]
    assert after["updates"] == before["updates"] and after["pushes"] == before["pushes"]
    assert after["pulls"] == before["pulls"]
    assert after["rejected_pushes"] == before["rejected_pushes"] + len(refusals)
    np.testing.assert_array_equal(client.pull()["b"], PARAMS["b"])


def test_attach_refuses_strangers_and_odd_files(attached):
    client, stub = attached
    name = client.links[0].mailbox.name
    cases = [
        (ps_pb2.AttachRequest(worker=5, name=name, size=64), "not one of the 2 workers"),
        (ps_pb2.AttachRequest(worker=0, name="tinyps-../../x", size=64), "is not tinyps-"),
        (ps_pb2.AttachRequest(worker=0, name="tinyps-" + "a" * 32, size=-1), "size must be"),
    ]
    for request, words in cases:
        code, details = _refused(stub.Attach, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details
    code, details = _refused(stub.Attach, ps_pb2.AttachRequest(
        worker=0, name="tinyps-" + "b" * 32, size=64))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another host" in details


def test_chunks_in_flight_to_one_server_share_one_mailbox():
    # 4 requests at once on the first call: one Attach, and every chunk read from it.
    big = {"w": np.linspace(0, 1, 4096, dtype=np.float32)}
    grads = {"w": np.linspace(1, 2, 4096, dtype=np.float32)}
    ends = {}
    for shared in (False, True):
        running = serve(mode="async", workers=1)
        try:
            with PSClient([running.address], shared_memory=shared, chunk_bytes=4096,
                          in_flight=4) as client:
                client.init(big, "sgd", lr=0.5)
                ends[shared] = client.push_pull(grads, 0).params["w"]
                assert len([m for m in client._mailboxes.values() if m]) == int(shared)
                assert running.store.stats()["updates"] == 4  # four keys, one update each
        finally:
            running.stop(0)
    np.testing.assert_array_equal(ends[True], ends[False])
    np.testing.assert_array_equal(ends[True], big["w"] - 0.5 * grads["w"])
