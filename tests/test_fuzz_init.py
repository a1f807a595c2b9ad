"""Random and malformed Init layouts against a live server over gRPC: huge sizes, overlaps, bad
ranges, conflicting shapes, garbage names, many keys, bad optimizers and values, mangled bytes.
Every reply is a proper status code (never UNKNOWN or INTERNAL), a refused Init keeps no
layout, and after the fuzz a good Init succeeds. Run with -s to see the figures."""

import grpc
import numpy as np

from ps import ps_pb2
from ps.codec import write_slice
from ps.server import serve

REQUESTS = 800
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK}
BUDGET_MB = 64  # the fuzz's accepted layouts stay small on a shared machine
SGD = ps_pb2.OptimizerSettings(name="sgd", lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)


def _spec(name, shape, start, stop):
    return ps_pb2.KeySpec(name=name, tensor_shape=[int(d) for d in shape], start=int(start),
                          stop=int(stop))


def _name(rng):
    kind = rng.integers(6)
    if kind == 0:
        return ""
    if kind == 1:  # any code points, control characters and surrogates' neighbours included
        return "".join(chr(int(c)) for c in rng.integers(1, 0xD7FF, rng.integers(1, 30)))
    if kind == 2:
        return "x" * int(rng.integers(1000, 20_000))
    if kind == 3:
        return "dense0.weight\x00\n\t"
    return str(rng.choice(["dense0.weight", "dense0.bias", "w", "ü.β"]))


def _huge(rng):
    """Sizes past any budget or int64: 2**33 with adam, 2**40, products of big dimensions."""
    dims = [int(2 ** rng.integers(20, 62)) for _ in range(rng.integers(1, 4))]
    total = int(np.prod([float(d) for d in dims]))
    stop = min(total, 2**63 - 1)
    return [_spec("w", dims, 0, stop)]


def _overlapping(rng):
    size = int(rng.integers(2, 100))
    a = sorted(rng.integers(0, size + 1, 2))
    b = sorted(rng.integers(0, size + 1, 2))
    return [_spec("w", [size], a[0], a[1] + 1), _spec("w", [size], b[0], b[1] + 1)]


def _bad_range(rng):
    size = int(rng.integers(0, 50))
    start, stop = (int(x) for x in rng.integers(-2**62, 2**62, 2)) if rng.random() < 0.3 else (
        int(rng.integers(-5, size + 5)), int(rng.integers(-5, size + 5)))
    shape = [size] if rng.random() < 0.8 else [int(rng.integers(-3, 4)), int(rng.integers(-3, 4))]
    return [_spec(_name(rng), shape, start, stop)]


def _two_shapes(rng):
    return [_spec("w", [10], 0, 5), _spec("w", [int(rng.integers(1, 4)), 5], 5, 10)]


def _many(rng):
    n = int(rng.integers(1000, 3000))
    keys = [_spec(f"t{i % 997}", [n], i, i + 1) for i in range(n)]  # names repeat: overlaps
    if rng.random() < 0.5:
        keys.append(keys[int(rng.integers(n))])
    return keys


def _good(rng):
    size = int(rng.integers(1, 2000))
    cut = int(rng.integers(1, size + 1))
    keys = [_spec("w", [size], 0, cut)]
    if cut < size:
        keys.append(_spec("w", [size], cut, size))
    return keys


LAYOUTS = [_huge, _overlapping, _bad_range, _two_shapes, _many, _good]
WEIGHTS = [0.25, 0.25, 0.25, 0.12, 0.05, 0.08]  # good layouts (kept: a new server) rarely


def _optimizer(rng):
    if rng.random() < 0.7:
        return ps_pb2.OptimizerSettings(name=str(rng.choice(["sgd", "momentum", "adam"])),
                                        lr=0.1, momentum=0.5, beta1=0.9, beta2=0.999, eps=1e-8)
    return ps_pb2.OptimizerSettings(name=_name(rng), lr=float(rng.choice([0, -1, np.nan, 1e300])),
                                    momentum=float(rng.choice([-1, 1, 0.5])),
                                    beta1=float(rng.choice([1, np.inf])), eps=-1.0)


def _values(rng, keys):
    out = []
    for spec in keys[: int(rng.integers(0, 3))]:
        size = max(0, min(spec.stop - spec.start, 10_000))
        values = rng.standard_normal(max(0, size + int(rng.integers(-1, 2)) * (rng.random() < 0.3)))
        values = values.astype(np.float32)
        if values.size and rng.random() < 0.2:
            values[0] = np.nan
        piece = write_slice(ps_pb2.Slice(), spec.name if rng.random() < 0.9 else "nope",
                            spec.start, values)
        out.append(piece)
    return out


def _request(rng) -> bytes:
    keys = LAYOUTS[int(rng.choice(len(LAYOUTS), p=WEIGHTS))](rng)
    request = ps_pb2.InitRequest(optimizer=_optimizer(rng), keys=keys, values=_values(rng, keys))
    payload = request.SerializeToString()
    if rng.random() < 0.15:  # mangle the bytes
        data = bytearray(payload)
        for i in rng.integers(0, max(1, len(data)), rng.integers(1, 6)):
            if data:
                data[i % len(data)] ^= 1 << int(rng.integers(8))
        payload = bytes(data[: int(rng.integers(0, len(data) + 1))])
    return payload


def test_init_layouts_random_and_malformed_never_answer_unknown():
    rng = np.random.default_rng(22)
    running = serve(mode="async", workers=1, memory_budget_mb=BUDGET_MB)
    channel = grpc.insecure_channel(running.address)
    codes: dict[grpc.StatusCode, int] = {}
    unexpected = []
    try:
        for i in range(REQUESTS):
            try:
                channel.unary_unary("/tinyps.ParameterServer/Init")(_request(rng), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                if code not in EXPECTED:
                    unexpected.append((i, code, err.details()))
            codes[code] = codes.get(code, 0) + 1
            if code is grpc.StatusCode.OK:  # a good layout: it is kept; start afresh
                channel.close()
                running.stop(0)
                running = serve(mode="async", workers=1, memory_budget_mb=BUDGET_MB)
                channel = grpc.insecure_channel(running.address)
            else:
                assert running.store.layout() == (), (i, code)  # a refusal keeps nothing
        # After the fuzz, a good init succeeds on the server that refused everything.
        reply = ps_pb2.InitReply.FromString(channel.unary_unary("/tinyps.ParameterServer/Init")(
            ps_pb2.InitRequest(optimizer=SGD, keys=[_spec("w", [3], 0, 3)]).SerializeToString(),
            timeout=10))
        assert reply.created
    finally:
        channel.close()
        running.stop(0)
    figures = {code.name: n for code, n in sorted(codes.items(), key=lambda c: c[0].name)}
    unknown = codes.get(grpc.StatusCode.UNKNOWN, 0)
    print(f"\ninit fuzz: {REQUESTS} requests; codes {figures}; UNKNOWN {unknown}")
    assert not unexpected, unexpected[:5]
    assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > REQUESTS // 2
