"""Links (ps/link.py, ps/local_link.py): the plain gRPC link and the fast local one give the same
answers to the same calls; a lost mailbox is known by its reason, never by the words of the
details; and the servicer sees one request shape whichever way the tensors came (ps/inbox.py)."""

import math
import sys

import grpc
import numpy as np
import pytest

from ps import ps_pb2
from ps.client import PSClient, PSError
from ps.codec import encode_push_request
from ps.inbox import Inbox, TensorRequest
from ps.keys import Key
from ps.link import Gradients, GrpcLink, Link
from ps.local import LocalChannel, LocalError, LocalServer
from ps.local_link import LocalLink
from ps.mailbox import MAILBOX_LOST, REASON_KEY, Mailbox, MailboxLost
from ps.server import serve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the fast link needs /dev/shm and abstract sockets")

PARAMS = {"a": np.linspace(-1, 1, 600, dtype=np.float32), "b": np.arange(5, dtype=np.float32)}
KEYS = [Key("a", (600,), 0, 300), Key("a", (600,), 300, 600), Key("b", (5,), 0, 5)]


def _out() -> dict[str, np.ndarray]:
    return {name: np.full(value.size, np.nan, np.float32) for name, value in PARAMS.items()}


def _session(link: Link, dtype: str) -> list:
    """The same calls on a link: pull, push, pull, push_pull, pull; everything they answered."""
    link.set_keys(KEYS)
    seen = []
    out = _out()
    view = link.pull(KEYS, None, dtype, 10, out)
    seen.append([(s.name, s.start, s.version) for s in view.slices])
    seen.append({k: v.copy() for k, v in out.items()})
    grads = [(k, np.full(k.size, 0.25 * (i + 1), np.float32), 0) for i, k in enumerate(KEYS)]
    reply = link.push(Gradients(0, grads, dtype, scale=2.0), 10)
    seen.append((reply.accepted, reply.duplicates, reply.staleness_max))
    reply = link.push(Gradients(0, grads, dtype, scale=2.0), 10)  # a retry: acknowledged only
    seen.append((reply.accepted, reply.duplicates, reply.staleness_max))
    out = _out()
    view = link.push_pull(Gradients(1, grads, dtype), 10, out)
    seen.append(([(s.name, s.start, s.version) for s in view.slices], view.staleness_max,
                 view.step_skipped))
    seen.append({k: v.copy() for k, v in out.items()})
    skipped = [(k, np.zeros(0, np.float32), 2) for k in KEYS]
    view = link.push_pull(Gradients(2, skipped, dtype, skip=True), 10, _out())
    seen.append(view.step_skipped)
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_plain_and_the_fast_link_give_the_same_answers(dtype):
    answers, local_calls = {}, {}
    for fast in (False, True):
        running = serve(mode="async", workers=1)
        try:
            with PSClient([running.address], chunk_bytes=1200) as client:
                client.init(PARAMS, "momentum", lr=0.5)  # "a": two keys, as KEYS
            link = GrpcLink(running.address)
            if fast:
                link = LocalLink(link)
            try:
                answers[fast] = _session(link, dtype)
                if fast:
                    assert isinstance(link.mailbox, Mailbox) and link.channel is not None
            finally:
                link.close()
            local_calls[fast] = running.local.calls
        finally:
            running.stop(0)
    assert local_calls == {False: 0, True: 5}  # every tensor call of the fast link, locally
    for got, want in zip(answers[True], answers[False], strict=True):
        if isinstance(want, dict):
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        else:
            assert got == want
    assert answers[True][-1] is True  # the skipped step says so on both


class _Scripted(grpc.RpcError):
    """A refusal as gRPC raises it, with trailing metadata of the test's choosing."""

    def __init__(self, details: str, metadata: tuple) -> None:
        self._details, self._metadata = details, metadata

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._metadata


@pytest.fixture
def fast_on_grpc():
    """A fast link that has attached a mailbox but calls through gRPC (no local channel), to a
    server initialised with PARAMS; and its server."""
    running = serve(mode="async", workers=1)
    with PSClient([running.address], chunk_bytes=1200) as client:
        client.init(PARAMS, "sgd", lr=0.5)
    link = LocalLink(GrpcLink(running.address))
    link.set_keys(KEYS)
    link.pull(KEYS, None, "float32", 10, _out())
    link.channel.close()
    link.channel = None  # the tensor calls now go through link.methods
    yield link, running
    link.close()
    running.stop(0)


def _script(link: LocalLink, details: str, metadata: tuple) -> list:
    """Make the next Push refused with these details and metadata; the calls, as they come."""
    real, calls = link.methods["Push"], []

    def push(request, **kwargs):
        calls.append(request)
        if len(calls) == 1:
            raise _Scripted(details, metadata)
        return real(request, **kwargs)

    link.methods["Push"] = push
    return calls


def _grads(step: int) -> Gradients:
    return Gradients(step, [(k, np.ones(k.size, np.float32), 0) for k in KEYS], "float32")


def test_the_reason_not_the_text_makes_the_fast_link_attach_again(fast_on_grpc):
    link, running = fast_on_grpc
    first, local_calls = link.mailbox, running.local.calls
    calls = _script(link, "words that say nothing of mailboxes",
                    ((REASON_KEY, MAILBOX_LOST),))
    assert link.push(_grads(0), 10).accepted == 3  # attached again, called again
    assert isinstance(link.mailbox, Mailbox) and link.mailbox is not first
    # the refused call went through gRPC; the new Attach brought a local channel for the retry
    assert len(calls) == 1 and link.channel is not None
    assert running.local.calls == local_calls + 1


def test_the_words_no_mailbox_without_the_reason_are_only_an_error(fast_on_grpc):
    link, running = fast_on_grpc
    first = link.mailbox
    calls = _script(link, "worker 0 has no mailbox tinyps-0: attach first", ())
    with pytest.raises(PSError) as err:
        link.push(_grads(0), 10)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == ""
    assert len(calls) == 1 and link.mailbox is first  # not attached again
    assert running.store.stats()["pushes"] == 0


def test_a_server_that_lost_the_mailbox_sends_the_reason_over_grpc_and_the_local_socket():
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=0.5)
        stranger = encode_push_request(0, 0, [("b", 0, np.ones(5, np.float32), 0)],
                                       offsets=[0], mailbox="tinyps-" + "d" * 32)
        with grpc.insecure_channel(running.address) as channel, \
                pytest.raises(grpc.RpcError) as remote:
            channel.unary_unary("/tinyps.ParameterServer/Push")(stranger, timeout=10)
        assert remote.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (REASON_KEY, MAILBOX_LOST) in tuple(remote.value.trailing_metadata())
        local = LocalChannel(running.local.name, running.local.key)
        try:
            with pytest.raises(LocalError) as err:
                local.call("Push", stranger, 10)
        finally:
            local.close()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                      MAILBOX_LOST)
        assert err.value.details == remote.value.details()
    finally:
        running.stop(0)


def test_a_restarted_server_is_reattached_whatever_its_words(monkeypatch):
    running = serve(mode="async", workers=1)
    port = running.port
    with PSClient([running.address], shared_memory=True) as client:
        client.init(PARAMS, "sgd", lr=0.5)
        client.pull()
        first = client.links[0].mailbox
        running.stop(0)

        real = Inbox._mailbox

        def lost(self, worker, name):
            try:
                return real(self, worker, name)
            except MailboxLost:
                raise MailboxLost("gone") from None  # no "no mailbox" in the words

        monkeypatch.setattr(Inbox, "_mailbox", lost)
        running = serve(port=port, mode="async", workers=1)  # has lost every mailbox
        try:
            client.init(PARAMS, "sgd", lr=0.5)
            result = client.push_pull({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
            assert client.links[0].mailbox is not first
            np.testing.assert_allclose(result.params["b"], PARAMS["b"] - 0.5, rtol=1e-6)
        finally:
            running.stop(0)


def test_a_wrapped_link_sees_every_call_and_changes_no_answer():
    class Counting(Link):
        def __init__(self, inner: Link) -> None:
            self.inner, self.address, self.calls = inner, inner.address, []

        def __getattr__(self, name):  # call, pull, push, push_pull, set_keys, close
            return getattr(self.inner, name)

        def call(self, method, request, timeout):
            self.calls.append(method)
            return self.inner.call(method, request, timeout)

        def pull(self, *args):
            self.calls.append("pull")
            return self.inner.pull(*args)

        def push(self, *args):
            self.calls.append("push")
            return self.inner.push(*args)

        def push_pull(self, *args):
            self.calls.append("push_pull")
            return self.inner.push_pull(*args)

        def set_keys(self, keys):
            self.inner.set_keys(keys)

        def close(self):
            self.inner.close()

    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address], wrap_link=Counting, shared_memory=True) as client:
            client.init(PARAMS, "sgd", lr=0.5)
            client.push({k: np.ones_like(v) for k, v in PARAMS.items()}, 0)
            got = client.pull()
            assert client.links[0].calls == ["Init", "push", "pull"]
        np.testing.assert_allclose(got["b"], PARAMS["b"] - 0.5, rtol=1e-6)
    finally:
        running.stop(0)


# -- the servicer's side: one request shape ---------------------------------------------


def test_a_push_in_the_message_and_through_a_mailbox_decode_to_one_request_shape():
    layout = tuple(KEYS)
    inbox = Inbox(lambda: layout)
    mailbox = Mailbox.create(4 * 605)
    try:
        inbox.attach(0, mailbox.name, mailbox.size)
        grads = [(k.name, k.start, np.arange(k.size, dtype=np.float32) + i, 3)
                 for i, k in enumerate(KEYS)]
        offsets = [0, 1200, 2400]
        for (_, _, values, _), offset in zip(grads, offsets, strict=True):
            mailbox.gradients(offset, np.float32, values.size)[:] = values
        in_message = inbox.push(encode_push_request(0, 4, grads, grad_scale=8.0))
        shared = inbox.push(encode_push_request(0, 4, grads, grad_scale=8.0, offsets=offsets,
                                                mailbox=mailbox.name))
        for request in (in_message, shared):
            assert isinstance(request, TensorRequest)
            assert (request.worker, request.step, request.keys, request.dtype, request.scale,
                    request.skip) == (0, 4, [k.id for k in KEYS], "float32", 8.0, False)
            for (name, start, values, version) in grads:
                raw, fmt, read = request.grads[(name, start)]
                np.testing.assert_array_equal(raw, values)
                assert (fmt, read) == ("float32", version)
        assert (in_message.owned, in_message.into) == (False, None)
        assert shared.owned and shared.received >= in_message.received - 100
        assert {k: offset for k, (offset, _) in shared.into.items()} == {
            k.id: o for k, o in zip(KEYS, offsets, strict=True)}
        assert shared.shared_bytes == 4 * 605
        pull = inbox.pull(ps_pb2.PullRequest(worker=0, step=-1, keys=[
            ps_pb2.KeyRef(name="b", start=0, offset=2400)], dtype="float16",
            mailbox=mailbox.name))
        assert (pull.step, pull.keys, pull.dtype, pull.grads) == (None, [("b", 0)], "float16", {})
        assert pull.into[("b", 0)][1].dtype == np.uint16 and pull.shared_bytes == 10
        with pytest.raises(MailboxLost) as err:
            inbox.pull(ps_pb2.PullRequest(worker=1, step=-1, mailbox=mailbox.name))
        assert err.value.reason == MAILBOX_LOST
    finally:
        mailbox.unlink()
        mailbox.close()


def test_the_local_frame_carries_a_reason_beside_the_status():
    def refuse(payload: bytes, context) -> bytes:
        context.set_trailing_metadata(((REASON_KEY, MAILBOX_LOST),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "x")
        return b""

    server = LocalServer({"Pull": refuse, "Push": lambda p, c: p, "PushPull": refuse})
    assert server.start()
    channel = LocalChannel(server.name, server.key)
    try:
        with pytest.raises(LocalError) as err:
            channel.call("Pull", b"", 10)
        assert (err.value.code, err.value.details, err.value.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION, "x", MAILBOX_LOST)
        assert channel.call("Push", b"ok", 10) == b"ok"  # and the stream goes on
    finally:
        channel.close()
        server.stop()


@pytest.mark.parametrize("name", ["deadline_s", "wait_s", "retry_s"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_a_client_refuses_a_deadline_that_is_not_one(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number of seconds > 0"):
        PSClient(["127.0.0.1:1"], **{name: value})
