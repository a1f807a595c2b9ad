"""10,000 random and malformed requests against a live server: it stays up, every reply is a
proper status code (never UNKNOWN or INTERNAL, which would be a bug), and no rejected request
changes its weights."""

import grpc
import numpy as np

from ps import ps_pb2
from ps.client import PSClient
from ps.codec import encode_push_request
from ps.server import serve

REQUESTS = 10_000
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
PARAMS = {"dense0.weight": np.ones((3, 4), np.float32), "dense0.bias": np.zeros(4, np.float32)}


def _valid_push(rng: np.random.Generator, step: int) -> bytes:
    items = [(name, 0, rng.standard_normal(value.size).astype(np.float32), 0)
             for name, value in PARAMS.items()]
    return encode_push_request(0, step, items, str(rng.choice(["float32", "float16"])))


def _mutate(rng: np.random.Generator, payload: bytes) -> bytes:
    data = bytearray(payload)
    kind = rng.integers(5)
    if kind == 0 and data:  # flip bits
        for i in rng.integers(0, len(data), rng.integers(1, 8)):
            data[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        data = data[: int(rng.integers(0, len(data) + 1))]
    elif kind == 2:  # random bytes
        data = bytearray(rng.bytes(int(rng.integers(0, 200))))
    elif kind == 3:  # insert junk
        at = int(rng.integers(0, len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 20)))
    else:  # a NaN in the values
        data += encode_push_request(0, 0, [("dense0.bias", 0, np.full(4, np.nan, np.float32),
                                            0)])
    return bytes(data)


def test_a_server_survives_ten_thousand_bad_requests():
    running = serve(mode="async", workers=1)  # one worker: no start line to wait at
    rng = np.random.default_rng(0)
    try:
        with PSClient([running.address]) as client:
            client.init(PARAMS, "sgd", lr=0.5)
        weights = lambda: [v.copy() for _, v, _ in running.store.pull(None, 0, None, 1.0)]  # noqa: E731
        before = weights()
        codes: dict[grpc.StatusCode, int] = {}
        accepted = 0
        with grpc.insecure_channel(running.address) as channel:
            push = channel.unary_unary("/tinyps.ParameterServer/Push")
            push_pull = channel.unary_unary("/tinyps.ParameterServer/PushPull")
            pull = channel.unary_unary("/tinyps.ParameterServer/Pull")
            init = channel.unary_unary("/tinyps.ParameterServer/Init")
            for i in range(REQUESTS):
                kind = i % 4
                if kind in (0, 1):  # pushes that are malformed, or valid but for a future step
                    payload = (_mutate(rng, _valid_push(rng, 0)) if rng.random() < 0.8
                               else _valid_push(rng, int(rng.integers(1, 1000))))
                    call = push if kind == 0 else push_pull
                elif kind == 2:  # pulls of random keys, steps, formats, or random bytes
                    request = ps_pb2.PullRequest(
                        worker=int(rng.integers(-3, 3)), step=int(rng.integers(-2, 3)),
                        keys=[ps_pb2.KeyRef(name=str(rng.choice(["dense0.weight", "x", ""])),
                                            start=int(rng.integers(-1, 3)))],
                        dtype=str(rng.choice(["float32", "float64", "bfloat16", "?"])))
                    payload = _mutate(rng, request.SerializeToString())
                    call = pull
                else:  # initialisations with other layouts, or garbage
                    request = ps_pb2.InitRequest(keys=[ps_pb2.KeySpec(
                        name="dense0.weight", tensor_shape=[int(rng.integers(-2, 9))],
                        start=int(rng.integers(-2, 4)), stop=int(rng.integers(-2, 9)))])
                    payload = _mutate(rng, request.SerializeToString())
                    call = init
                try:
                    call(payload, timeout=5)
                    accepted += 1
                    before = weights()  # an accepted request may move the weights
                except grpc.RpcError as err:
                    code = err.code()
                    codes[code] = codes.get(code, 0) + 1
                    assert code in EXPECTED, (i, code, err.details())
                    for a, b in zip(before, weights(), strict=True):
                        np.testing.assert_array_equal(a, b)
        figures = {code.name: n for code, n in sorted(codes.items(), key=lambda c: c[0].name)}
        print(f"\nfuzz: {REQUESTS} requests; {accepted} OK; codes {figures}; UNKNOWN "
              f"{codes.get(grpc.StatusCode.UNKNOWN, 0)}")
        assert sum(codes.values()) > REQUESTS * 0.9, codes  # most were bad, and refused
        stats = PSClient([running.address]).stats()[0]
        assert stats["rejected_pushes"] > 0
    finally:
        running.stop(0)
