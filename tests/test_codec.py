"""ps.codec writes and reads exactly protobuf's wire format for PullReply and PushRequest."""

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import ps_pb2, ps_pb2_grpc
from ps.client import PSClient
from ps.codec import (
    _IN_PLACE_MIN,
    CodecError,
    ReplyPlan,
    decode_pull_reply,
    decode_push_request,
    decode_slice,
    encode_pull_reply,
    encode_push_request,
    write_slice,
)
from ps.server import serve

names = st.text(min_size=1, max_size=12)
items = st.lists(
    st.tuples(names, st.integers(0, 2**40), st.integers(0, 40), st.integers(0, 2**40)),
    max_size=4,
)


def _arrays(spec, seed=0):
    rng = np.random.default_rng(seed)
    return [(n, s, rng.standard_normal(size, dtype=np.float32), v) for n, s, size, v in spec]


def _protobuf_reply(arrays):
    msg = ps_pb2.PullReply()
    for name, start, values, version in arrays:
        write_slice(msg.values.add(), name, start, values, version)
    return msg


@settings(deadline=None, max_examples=60)
@given(items)
def test_pull_reply_bytes_are_protobufs_bytes(spec):
    arrays = _arrays(spec)
    ours = encode_pull_reply(arrays)
    assert ours == _protobuf_reply(arrays).SerializeToString()
    reply = decode_pull_reply(ours)
    pieces = reply.slices
    assert reply.staleness_max == 0 and not reply.step_skipped
    for piece, (name, start, values, version) in zip(pieces, arrays, strict=True):
        assert (piece.name, piece.start, piece.version) == (name, start, version)
        np.testing.assert_array_equal(decode_slice(piece), values)


@settings(deadline=None, max_examples=60)
@given(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1), items)
def test_push_request_round_trips_through_protobuf(worker, step, spec):
    arrays = _arrays(spec, seed=1)
    ours = encode_push_request(worker, step, arrays)
    parsed = ps_pb2.PushRequest.FromString(ours)
    assert (parsed.worker, parsed.step) == (worker, step)
    theirs = ps_pb2.PushRequest(worker=worker, step=step)
    for name, start, values, version in arrays:
        write_slice(theirs.grads.add(), name, start, values, version)
    assert ours == theirs.SerializeToString()
    got = decode_push_request(theirs.SerializeToString())
    assert (got.worker, got.step, len(got.slices)) == (worker, step, len(arrays))
    assert (got.grad_scale, got.skip) == (1.0, False)


def test_pull_reply_carries_the_push_staleness():
    arrays = _arrays([("w", 0, 3, 7)])
    ours = encode_pull_reply(arrays, staleness_max=5)
    expected = _protobuf_reply(arrays)
    expected.staleness_max = 5
    assert ours == expected.SerializeToString()
    assert decode_pull_reply(ours).staleness_max == 5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_slices_halve_the_bytes_and_decode_to_the_rounded_values(dtype):
    from kernels import round_to_bf16, round_to_fp16

    values = np.random.default_rng(2).standard_normal(1000, dtype=np.float32)
    ours = encode_push_request(3, 7, [("w", 0, values, 2)], dtype, grad_scale=1024.0,
                               skip=False)
    theirs = ps_pb2.PushRequest.FromString(ours)
    assert theirs.grad_scale == 1024.0 and theirs.grads[0].dtype == dtype
    assert len(theirs.grads[0].data) == 2 * values.size
    got = decode_push_request(ours)
    assert got.grad_scale == 1024.0
    rounded = (round_to_fp16 if dtype == "float16" else round_to_bf16)(values)
    np.testing.assert_array_equal(decode_slice(got.slices[0]), rounded)
    reply = encode_pull_reply([("w", 0, values, 2)], step_skipped=True, dtype=dtype)
    assert ps_pb2.PullReply.FromString(reply).step_skipped
    np.testing.assert_array_equal(decode_slice(decode_pull_reply(reply).slices[0]), rounded)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_large_16_bit_slices_written_in_place_are_protobufs_bytes(dtype):
    # From _IN_PLACE_MIN values up, the kernel writes the codes straight into the message;
    # below, they go through an array. Both must give protobuf's bytes, in any mix.
    from kernels import bf16_encode, fp16_encode

    encode = fp16_encode if dtype == "float16" else bf16_encode
    rng = np.random.default_rng(3)
    sizes = [_IN_PLACE_MIN - 1, _IN_PLACE_MIN, 3, _IN_PLACE_MIN + 17]
    arrays = [(f"t{i}", 5 * i, rng.standard_normal(n, dtype=np.float32), i)
              for i, n in enumerate(sizes)]
    arrays[2][2][1] = np.float32(np.nan)  # codes of every kind travel as they are
    arrays[3][2][:4] = [np.inf, -np.inf, 1e-8, -0.0]

    def protobuf_slice(msg, name, start, values, version):
        msg.name, msg.start, msg.dtype, msg.version = name, start, dtype, version
        msg.shape.append(values.size)
        msg.data = encode(values).tobytes()

    request = ps_pb2.PushRequest(worker=4, step=9, grad_scale=512.0)
    reply = ps_pb2.PullReply(staleness_max=2)
    for item in arrays:
        protobuf_slice(request.grads.add(), *item)
        protobuf_slice(reply.values.add(), *item)
    assert encode_push_request(4, 9, arrays, dtype, 512.0) == request.SerializeToString()
    assert encode_pull_reply(arrays, 2, dtype=dtype) == reply.SerializeToString()


def test_reading_accepts_unpacked_shapes_and_skips_unknown_fields():
    # Slice{name: "w", shape: [2] unpacked, data: 8 bytes, field 9: varint 1, field 10: fixed64}
    data = np.array([1.5, -2.0], "<f4").tobytes()
    slice_bytes = (b"\x0a\x01w" + b"\x1a\x07float32" + b"\x20\x02" + b"\x2a\x08" + data
                   + b"\x48\x01" + b"\x51" + b"\x00" * 8)
    payload = b"\x0a" + bytes([len(slice_bytes)]) + slice_bytes
    (piece,) = decode_pull_reply(payload).slices
    assert piece.shape == (2,)
    np.testing.assert_array_equal(decode_slice(piece), [1.5, -2.0])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x1a\x05\x0a\x01", "claims 5 bytes"),
        (b"\x08\xff\xff", "ends inside a varint"),
        (b"\x08" + b"\xff" * 11, "longer than ten bytes"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x1a\x03\x0a\x01\xff", "not UTF-8"),
    ],
)
def test_malformed_bytes_are_refused(payload, message):
    with pytest.raises(CodecError, match=message):
        decode_push_request(payload)


def test_a_malformed_push_is_invalid_argument_not_a_crash():
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address]) as client:
            client.init({"w": np.ones(2, np.float32)}, "sgd", lr=1.0)
        with grpc.insecure_channel(running.address) as channel:
            push = channel.unary_unary("/tinyps.ParameterServer/Push")
            with pytest.raises(grpc.RpcError) as err:
                push(b"\x1a\x05\x0a\x01", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A stock generated stub reads our hand-written Pull reply as a PullReply.
            reply = ps_pb2_grpc.ParameterServerStub(channel).Pull(
                ps_pb2.PullRequest(step=-1), timeout=10)
        assert reply.values[0].name == "w"
        np.testing.assert_array_equal(decode_slice(reply.values[0]), [1.0, 1.0])
    finally:
        running.stop(0)


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_large_16_bit_pushes_and_pulls_through_a_server(wire_dtype):
    # Past _IN_PLACE_MIN values the codes go straight into the messages both ways; the
    # weights must be what decoding the codes and stepping gives, and the pull their codes.
    from kernels import bf16_decode, bf16_encode, fp16_decode, fp16_encode, sgd_update

    encode, decode = ((fp16_encode, fp16_decode) if wire_dtype == "float16"
                      else (bf16_encode, bf16_decode))
    rng = np.random.default_rng(6)
    start = rng.standard_normal(_IN_PLACE_MIN + 5, dtype=np.float32)
    grad = rng.standard_normal(start.size, dtype=np.float32)
    running = serve(mode="async", workers=1)
    try:
        with PSClient([running.address], wire_dtype=wire_dtype) as client:
            client.init({"w": start}, "sgd", lr=0.5)
            client.push({"w": grad}, 0)
            pulled = client.pull()["w"]
    finally:
        running.stop(0)
    master = start.copy()
    sgd_update(master, decode(encode(grad)), 0.5)  # the server steps as decode-then-update
    np.testing.assert_array_equal(pulled, decode(encode(master)))


def _planned(spec, dtype, expected, actual, staleness=0, skipped=False):
    """A reply made as the servicer makes one: laid out for `expected` versions, the values
    written into it as the store writes them, then finished for the `actual` ones."""
    from ps.keys import Key
    from ps.memory import filled_bytes
    from ps.packed import write_values

    keys = [Key(f"{name}{i}", (start + size,), start, start + size)  # as in a layout: unique,
            for i, (name, start, size, _) in enumerate(spec)]  # never empty
    values = [np.random.default_rng(i).standard_normal(k.size, dtype=np.float32)
              for i, k in enumerate(keys)]
    plan = ReplyPlan(keys, dtype, expected, staleness)
    fitted = []

    def fill(dest):
        out = plan.destinations(dest)
        for key, v in zip(keys, values, strict=True):
            write_values(v, out[key.id])
        fitted.append(plan.finish(dest, actual, skipped))

    payload = filled_bytes(plan.size, fill)
    return payload, fitted[0], [(k.name, k.start, v, version)
                                for k, v, version in zip(keys, values, actual, strict=True)]


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(names, st.integers(0, 2**40), st.integers(1, 40),
                          st.integers(0, 2**40)), max_size=4),
       st.sampled_from(["float32", "float16", "bfloat16"]), st.integers(0, 3))
def test_a_planned_reply_is_protobufs_bytes_when_the_versions_fit(spec, dtype, staleness):
    versions = [v for *_, v in spec]
    payload, fitted, arrays = _planned(spec, dtype, versions, versions, staleness)
    assert fitted
    assert payload == encode_pull_reply(arrays, staleness, dtype=dtype)


@pytest.mark.parametrize(("expected", "actual", "skipped"), [
    ([127], [128], False),  # the varint grew a byte
    ([0], [1], False),  # version 0 is left out of the message; 1 is not
    ([5], [5], True),  # a skipped step adds a field
])
def test_a_planned_reply_that_does_not_fit_says_so(expected, actual, skipped):
    _, fitted, _ = _planned([("w", 0, 8, 0)], "float32", expected, actual, skipped=skipped)
    assert not fitted
