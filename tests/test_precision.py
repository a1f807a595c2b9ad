"""kernels.precision against its twins: every half and bfloat16 value, every tie, and random
bit patterns; the exhaustive sweep over all 2**32 float32 patterns is marked slow."""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import twins.precision as twin
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kernels.precision import (
    HARDWARE_HALF,
    _fp16_decode_hw,
    _fp16_decode_kernel,
    _fp16_encode_hw,
    _fp16_encode_kernel,
    _round_to_fp16_hw,
    _round_to_fp16_kernel,
    bf16_all_finite,
    bf16_decode,
    bf16_encode,
    fp16_all_finite,
    fp16_decode,
    fp16_encode,
    round_to_bf16,
    round_to_fp16,
)

ALL_CODES = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
NAN_BITS = [0x7F800001, 0x7F801FFF, 0x7F802000, 0x7FA00000, 0x7FBFFFFF, 0x7FC00000,
            0x7FC00001, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0xFFFFE000, 0xFFFFFFFF]


def f32(bits):
    """float32 array holding the given bit patterns."""
    return np.asarray(bits, dtype=np.uint64).astype(np.uint32).view(np.float32)


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[got.itemsize]
    g, w = got.view(bits).ravel(), want.view(bits).ravel()
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{bad.size} of {g.size} differ; first at {bad[0]}: got {g[bad[0]]:#x}, "
        f"want {w[bad[0]]:#x}")


def with_neighbours(x):
    """x, and the float32 one ulp below and above each element, with both signs."""
    down, up = np.nextafter(x, np.float32(-np.inf)), np.nextafter(x, np.float32(np.inf))
    x = np.concatenate([x, down, up])
    return np.concatenate([x, -x])


@pytest.fixture(scope="module")
def random_floats():
    """Ten million random bit patterns: every exponent, NaN payload and subnormal alike."""
    rng = np.random.default_rng(20240607)
    return rng.integers(0, 2**32, size=10_000_000, dtype=np.uint32).view(np.float32)


# --- IEEE half -------------------------------------------------------------------------------


def test_fp16_decode_every_code():
    assert_same_bits(fp16_decode(ALL_CODES), twin.fp16_decode(ALL_CODES))


def test_every_half_value_round_trips():
    x = twin.fp16_decode(ALL_CODES)  # NaN codes included: their payloads must come back too
    assert_same_bits(fp16_encode(x), ALL_CODES)
    assert_same_bits(round_to_fp16(x), x)


def half_midpoints():
    """Midpoint between each pair of neighbouring non-negative halves, codes 0 .. 0x7BFF, and
    the code of the even neighbour that a tie must go to. The last pair is 65504 and the
    next binade's 65536 (which half cannot hold): their midpoint 65520 must become inf."""
    values = twin.fp16_decode(ALL_CODES[:0x7C01]).astype(np.float64)
    values[-1] = 2.0**16
    mid = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # 12 bits: exact in float32
    codes = ALL_CODES[:0x7C00].astype(np.uint32)
    even = np.where(codes % 2 == 0, codes, codes + 1).astype(np.uint16)
    return mid, codes.astype(np.uint16), even


def test_fp16_ties_go_to_the_even_neighbour():
    mid, _, even = half_midpoints()
    assert_same_bits(fp16_encode(mid), even)
    assert_same_bits(fp16_encode(-mid), even | np.uint16(0x8000))
    assert fp16_encode(f32([0x477FF000]))[0] == 0x7C00  # 65520 -> inf


def test_fp16_one_ulp_off_a_midpoint_goes_to_the_nearer_neighbour():
    mid, below, _ = half_midpoints()
    assert_same_bits(fp16_encode(np.nextafter(mid, np.float32(0))), below)
    assert_same_bits(fp16_encode(np.nextafter(mid, np.float32(np.inf))), below + np.uint16(1))


def test_fp16_midpoints_and_their_neighbours_match_numpy():
    mid, _, _ = half_midpoints()
    x = with_neighbours(mid)
    assert_same_bits(round_to_fp16(x), twin.round_to_fp16(x))
    assert_same_bits(fp16_encode(x), twin.fp16_encode(x))


@pytest.mark.parametrize(
    ("x", "want"),
    [
        (0.0, 0.0),
        (2.0**-14, 2.0**-14),  # smallest normal half
        (2.0**-24, 2.0**-24),  # smallest subnormal half
        (2.0**-25, 0.0),  # halfway to 2**-24: ties to the even 0
        (np.nextafter(np.float32(2.0**-25), np.float32(1)), 2.0**-24),
        (1.5 * 2.0**-24, 2.0**-23),  # tie between 1 and 2 steps: to 2
        (2.5 * 2.0**-24, 2.0**-23),  # tie between 2 and 3 steps: to 2
        (1023.5 * 2.0**-24, 2.0**-14),  # tie between largest subnormal and smallest normal
        (1.0 + 2.0**-11, 1.0),  # tie at 1: to even
        (1.0 + 3 * 2.0**-11, 1.0 + 2.0**-9),
        (65504.0, 65504.0),  # largest finite half
        (65519.99609375, 65504.0),  # largest float32 below 65520
        (65520.0, np.inf),
        (65536.0, np.inf),
        (3.4028235e38, np.inf),
        (np.inf, np.inf),
        (1e-45, 0.0),  # smallest float32 subnormal
    ],
)
def test_round_to_fp16_known_values(x, want):
    for sign in (1, -1):
        got = round_to_fp16(np.array([sign * x], np.float32))
        assert_same_bits(got, np.array([sign * want], np.float32))


def test_fp16_special_values_keep_their_sign():
    x = np.array([0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30, 1e30, -1e30], np.float32)
    got = round_to_fp16(x)
    assert_same_bits(got, twin.round_to_fp16(x))
    assert_same_bits(np.signbit(got), np.signbit(x))


def test_fp16_nan_payloads_match_numpy_bit_for_bit():
    # NumPy keeps the sign and the top 10 payload bits, does not quieten a signalling NaN,
    # and makes a payload that would vanish into 1 (0x7F800001 -> 0x7C01 -> 0x7F802000).
    x = f32(NAN_BITS)
    got = round_to_fp16(x)
    assert np.isnan(got).all()
    assert_same_bits(np.signbit(got), np.signbit(x))
    assert_same_bits(got, twin.round_to_fp16(x))
    assert_same_bits(fp16_encode(x), twin.fp16_encode(x))
    assert fp16_encode(f32([0x7F800001]))[0] == 0x7C01


def test_fp16_subnormal_range():
    # Every 101st float32 from just below 2**-25 (half to the smallest subnormal half) to
    # just above 2**-14 (the smallest normal), and some float32 subnormals, which become 0.
    x = np.concatenate([np.arange(0x32FF0000, 0x38810000, 101, dtype=np.uint32),
                        np.arange(0, 0x00800000, 4099, dtype=np.uint32)]).view(np.float32)
    x = np.concatenate([x, -x])
    assert_same_bits(round_to_fp16(x), twin.round_to_fp16(x))
    assert_same_bits(fp16_encode(x), twin.fp16_encode(x))


def test_fp16_overflow_boundary_in_full():
    x = np.arange(0x477F0000, 0x47810000, dtype=np.uint32).view(np.float32)  # 65280 .. 66048
    x = np.concatenate([x, -x])
    assert_same_bits(round_to_fp16(x), twin.round_to_fp16(x))
    assert_same_bits(fp16_encode(x), twin.fp16_encode(x))


def test_fp16_ten_million_random_patterns(random_floats):
    x = random_floats
    assert_same_bits(round_to_fp16(x), twin.round_to_fp16(x))
    assert_same_bits(fp16_encode(x), twin.fp16_encode(x))


def _both(kernels, x, out_dtype):
    """What each of two kernels (hardware, bit arithmetic) writes for the same input."""
    outs = []
    for kernel in kernels:
        out = np.empty(x.size, out_dtype)
        if x.dtype == np.float32:
            kernel(x, x.view(np.uint32), out)
        else:
            kernel(x, out)
        outs.append(out)
    return outs


@pytest.mark.skipif(not HARDWARE_HALF, reason="this CPU has no float32 <-> half instructions")
def test_the_fpu_and_the_bit_arithmetic_agree(random_floats):
    # The public functions use the FPU where there is one: the bit-arithmetic kernels, the
    # fallback elsewhere, must give the same bits (NaN payloads and subnormals included).
    x = np.concatenate([random_floats, f32(NAN_BITS), with_neighbours(f32(
        [0x33000000, 0x33800000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000]))])
    assert_same_bits(*_both([_fp16_encode_hw, _fp16_encode_kernel], x, np.uint16))
    assert_same_bits(*_both([_round_to_fp16_hw, _round_to_fp16_kernel], x, np.uint32))
    assert_same_bits(*_both([_fp16_decode_hw, _fp16_decode_kernel], ALL_CODES, np.uint32))


def test_fp16_encode_then_decode_is_round(random_floats):
    x = random_floats[:1_000_000]
    assert_same_bits(fp16_decode(fp16_encode(x)), round_to_fp16(x))
    r = round_to_fp16(x)
    assert_same_bits(round_to_fp16(r), r)  # rounding is idempotent


def test_numpy_agrees_with_the_float64_derivation(random_floats):
    # The fp16 twin is NumPy; check it against rounding done from first principles, so the
    # specification does not rest on NumPy alone.
    mid, _, _ = half_midpoints()
    x = np.concatenate([random_floats[:1_000_000], with_neighbours(mid)])
    x = x[~np.isnan(x)]
    assert_same_bits(twin.round_to_fp16(x), twin.round_to_fp16_by_float64(x))


# --- bfloat16 --------------------------------------------------------------------------------


def test_bf16_decode_every_code():
    assert_same_bits(bf16_decode(ALL_CODES), twin.bf16_decode(ALL_CODES))
    assert_same_bits(bf16_decode(ALL_CODES).view(np.uint32) >> 16, ALL_CODES.astype(np.uint32))


def test_every_bf16_value_round_trips():
    x = twin.bf16_decode(ALL_CODES)
    nan = np.isnan(x)
    want = np.where(nan, twin.BF16_NAN, ALL_CODES).astype(np.uint16)
    assert_same_bits(bf16_encode(x), want)
    assert_same_bits(round_to_bf16(x), bf16_decode(want))


def bf16_midpoints():
    """Midpoints between neighbouring non-negative bfloat16 codes 0 .. 0x7F80 as float32
    (the bit pattern halfway between two codes is the value halfway, even across binades
    and between the largest finite value and inf), and the even neighbour's code."""
    codes = ALL_CODES[:0x7F80].astype(np.uint32)
    mid = ((codes << 16) | 0x8000).view(np.float32)
    even = np.where(codes % 2 == 0, codes, codes + 1).astype(np.uint16)
    return mid, codes.astype(np.uint16), even


def test_bf16_ties_go_to_the_even_neighbour():
    mid, _, even = bf16_midpoints()
    assert_same_bits(bf16_encode(mid), even)
    assert_same_bits(bf16_encode(-mid), even | np.uint16(0x8000))
    assert bf16_encode(f32([0x7F7F8000]))[0] == 0x7F80  # past the largest finite: inf


def test_bf16_one_ulp_off_a_midpoint_goes_to_the_nearer_neighbour():
    mid, below, _ = bf16_midpoints()
    assert_same_bits(bf16_encode(np.nextafter(mid, np.float32(0))), below)
    assert_same_bits(bf16_encode(np.nextafter(mid, np.float32(np.inf))), below + np.uint16(1))


def test_bf16_midpoints_and_their_neighbours_match_twins():
    mid, _, _ = bf16_midpoints()
    x = with_neighbours(mid)
    assert_same_bits(round_to_bf16(x), twin.round_to_bf16(x))
    assert_same_bits(bf16_encode(x), twin.bf16_encode(x))
    assert_same_bits(bf16_encode(x), twin.torch_bf16_encode(x))


def test_bf16_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45],
                 np.float32)
    want = np.array([0, 0x8000, 0x7F80, 0xFF80, 0x7F80, 0xFF80, 0, 0x8000], np.uint16)
    assert_same_bits(bf16_encode(x), want)
    assert_same_bits(round_to_bf16(x), twin.round_to_bf16(x))


def test_bf16_every_nan_becomes_torchs_quiet_nan():
    x = f32(NAN_BITS)
    assert_same_bits(bf16_encode(x), np.full(x.shape, twin.BF16_NAN))
    assert_same_bits(round_to_bf16(x).view(np.uint32), np.full(x.shape, 0x7FC00000, np.uint32))
    assert_same_bits(bf16_encode(x), twin.torch_bf16_encode(x))


def test_bf16_ten_million_random_patterns(random_floats):
    x = random_floats
    want = twin.bf16_encode(x)
    assert_same_bits(want, twin.torch_bf16_encode(x))  # the two twins agree
    assert_same_bits(bf16_encode(x), want)
    assert_same_bits(round_to_bf16(x), twin.bf16_decode(want))
    assert_same_bits(bf16_decode(bf16_encode(x)), round_to_bf16(x))


# --- shapes, views and errors ----------------------------------------------------------------

ROUNDS = [(round_to_fp16, twin.round_to_fp16), (round_to_bf16, twin.round_to_bf16)]
ENCODES = [(fp16_encode, twin.fp16_encode), (bf16_encode, twin.bf16_encode)]
DECODES = [(fp16_decode, twin.fp16_decode), (bf16_decode, twin.bf16_decode)]
ALL = ROUNDS + ENCODES + DECODES


def awkward_floats():
    """Float32 arrays of any shape up to 3-D, from bit patterns (NaN payloads, subnormals)
    and from hypothesis' float strategy (which leans on edge values)."""
    shapes = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    from_bits = arrays(np.uint32, shapes).map(lambda b: b.view(np.float32))
    from_floats = arrays(np.float32, shapes, elements=st.floats(width=32))
    return st.one_of(from_bits, from_floats)


def views_of(x):
    """x itself, a strided slice and a transpose: none of the last two is contiguous."""
    yield x
    if x.ndim:
        yield x[..., ::2]
        yield x.T
        yield x[::-1]


@settings(deadline=None, max_examples=150)  # the first call compiles
@given(awkward_floats())
def test_rounding_and_encoding_match_twins_on_awkward_arrays(x):
    for view in views_of(x):
        for kernel, reference in ROUNDS + ENCODES:
            before = view.copy()
            got = kernel(view)
            assert_same_bits(got, reference(view))
            assert got.flags.c_contiguous
            assert_same_bits(view, before)  # input untouched


@settings(deadline=None, max_examples=100)
@given(arrays(np.uint16, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)))
def test_decoding_matches_twins_on_awkward_arrays(bits):
    for view in views_of(bits):
        for kernel, reference in DECODES:
            assert_same_bits(kernel(view), reference(view))


@pytest.mark.parametrize(("kernel", "reference"), ALL)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (), (1,), (2, 3, 5)])
def test_shapes_are_kept(kernel, reference, shape):
    dtype = np.uint16 if kernel in (fp16_decode, bf16_decode) else np.float32
    x = np.ones(shape, dtype)
    got = kernel(x)
    assert got.shape == shape
    assert_same_bits(got, reference(x))


def test_read_only_buffers_from_the_wire():
    x = np.array([1.0, -2.5, 65520.0, 1e-6], np.float32)
    wire = np.frombuffer(x.tobytes(), np.float32)  # read-only, as a decoded message is
    assert_same_bits(round_to_fp16(wire), twin.round_to_fp16(x))
    assert_same_bits(round_to_bf16(wire), twin.round_to_bf16(x))
    codes = np.frombuffer(fp16_encode(x).tobytes(), np.uint16)
    assert_same_bits(fp16_decode(codes), twin.round_to_fp16(x))
    codes = np.frombuffer(bf16_encode(x).tobytes(), np.uint16)
    assert_same_bits(bf16_decode(codes), twin.round_to_bf16(x))


@pytest.mark.parametrize("kernel", [round_to_fp16, fp16_encode, round_to_bf16, bf16_encode])
def test_float64_input_is_refused_not_converted(kernel):
    with pytest.raises(TypeError, match=r"x must have dtype float32, got float64.*rounds twice"):
        kernel(np.zeros(3))


@pytest.mark.parametrize("kernel", [round_to_fp16, fp16_encode, round_to_bf16, bf16_encode])
@pytest.mark.parametrize("bad", [np.zeros(3, np.float16), np.zeros(3, np.uint32),
                                 np.zeros(3, ">f4")])
def test_other_dtypes_are_refused(kernel, bad):
    with pytest.raises(TypeError, match=rf"{kernel.__name__}: x must have dtype float32, got"):
        kernel(bad)


@pytest.mark.parametrize("encode", [fp16_encode, bf16_encode])
def test_encoders_write_into_out(encode):
    x = np.random.default_rng(4).standard_normal((3, 50), dtype=np.float32)
    buffer = np.full(160, 0xABCD, np.uint16)  # a message: codes in the middle of other bytes
    got = encode(x, out=buffer[5:155])
    assert got is not None and np.shares_memory(got, buffer)
    assert_same_bits(buffer[5:155], encode(x).reshape(-1))
    assert (buffer[:5] == 0xABCD).all() and (buffer[155:] == 0xABCD).all()


@pytest.mark.parametrize("encode", [fp16_encode, bf16_encode])
@pytest.mark.parametrize(("out", "problem"), [
    (np.zeros(6, np.float32), "out must be a numpy array of uint16, got float32"),
    ([0] * 6, "out must be a numpy array of uint16, got list"),
    (np.zeros(5, np.uint16), "6 elements .x's size., got 5 elements"),
    (np.zeros(12, np.uint16)[::2], "contiguous=False"),
    (np.frombuffer(bytes(12), np.uint16), "writable=False"),
])
def test_a_bad_out_is_refused_and_left_alone(encode, out, problem):
    before = np.array(out, copy=True)
    with pytest.raises((TypeError, ValueError), match=rf"{encode.__name__}: .*{problem}"):
        encode(np.ones(6, np.float32), out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


@pytest.mark.parametrize("kernel", [fp16_decode, bf16_decode])
def test_decode_wants_uint16(kernel):
    with pytest.raises(TypeError, match=r"bits must have dtype uint16, got float32"):
        kernel(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"got float16 \(to decode a float16 array's bits"):
        kernel(np.zeros(3, np.float16))


@pytest.mark.parametrize("kernel", [round_to_fp16, fp16_decode, round_to_bf16])
def test_non_arrays_are_refused(kernel):
    with pytest.raises(TypeError, match=r"must be a numpy array of .*, got list"):
        kernel([1.0, 2.0])


def test_kernels_run_as_plain_python():
    # NUMBA_DISABLE_JIT=1 is how a student steps through a kernel: it must give the same bits
    # and no warnings (e.g. integer overflow, or NaN arithmetic) as plain Python.
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import numpy as np
        from kernels.precision import (bf16_decode, bf16_encode, fp16_decode, fp16_encode,
                                       round_to_bf16, round_to_fp16)
        specials = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF, 0x7FC00000,
                    0x33000000, 0x33000001, 0x387FE000, 0x477FF000, 0x7F7FFFFF, 0x7F7F8000]
        rng = np.random.default_rng(0)
        bits = np.concatenate([np.array(specials, np.uint32),
                               rng.integers(0, 2**32, 2000, dtype=np.uint32)])
        x = bits.view(np.float32)
        with np.errstate(all="ignore"):
            h = x.astype(np.float16)
        assert (round_to_fp16(x).view(np.uint32) == h.astype(np.float32).view(np.uint32)).all()
        assert (fp16_encode(x) == h.view(np.uint16)).all()
        codes = np.arange(0, 2**16, 7).astype(np.uint16)
        want = codes.view(np.float16).astype(np.float32).view(np.uint32)
        assert (fp16_decode(codes).view(np.uint32) == want).all()
        b = bf16_encode(x)
        assert (round_to_bf16(x).view(np.uint32) == bf16_decode(b).view(np.uint32)).all()
        print("ok")
    """)
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- exhaustive ------------------------------------------------------------------------------


def every_float32(check):
    """Run check(x) on all 2**32 float32 bit patterns, in chunks of 2**24, on two threads
    (NumPy's casts release the GIL; the kernels are serial, so calling them from a thread
    pool is safe, as servers do)."""

    def run(start):
        check(np.arange(start, start + 2**24, dtype=np.uint32).view(np.float32))

    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in pool.map(run, range(0, 2**32, 2**24)):
            pass  # re-raises the first failing chunk's AssertionError


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fp16_on_every_float32():
    # NumPy is the slow side: its cast raises a floating-point flag for every element that
    # underflows or overflows, some 40 ns or more each, and most patterns do one or the other.
    def check(x):
        with np.errstate(all="ignore"):  # per thread
            half = x.astype(np.float16)
        assert_same_bits(fp16_encode(x), half.view(np.uint16))
        assert_same_bits(round_to_fp16(x), half.astype(np.float32))
        if HARDWARE_HALF:  # the public functions ran on the FPU: the fallback, too
            assert_same_bits(_both([_fp16_encode_kernel], x, np.uint16)[0],
                             half.view(np.uint16))

    every_float32(check)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bf16_on_every_float32():
    def check(x):
        code = bf16_encode(x)
        assert_same_bits(code, twin.torch_bf16_encode(x))
        assert_same_bits(round_to_bf16(x).view(np.uint32), code.astype(np.uint32) << 16)

    every_float32(check)


# --- finiteness of codes ---------------------------------------------------------------------

CODE_CHECKS = [(fp16_all_finite, twin.fp16_all_finite, twin.fp16_decode, 0x7C00),
               (bf16_all_finite, twin.bf16_all_finite, twin.bf16_decode, 0x7F80)]


@pytest.mark.parametrize(("kernel", "spec", "decode", "exponent"), CODE_CHECKS)
def test_codes_all_finite_every_code(kernel, spec, decode, exponent):
    # Each code alone, and the rule it follows: not finite exactly when the exponent bits are
    # all ones (inf, NaN, either sign).
    for code in ALL_CODES:
        one = code.reshape(1)
        assert kernel(one) == spec(one) == ((int(code) & exponent) != exponent), hex(code)


@pytest.mark.parametrize(("kernel", "spec", "decode", "exponent"), CODE_CHECKS)
def test_codes_all_finite_finds_one_bad_code_anywhere(kernel, spec, decode, exponent):
    # One inf or NaN among finite codes, at the ends and on either side of a chunk boundary.
    rng = np.random.default_rng(7)
    finite = rng.choice(ALL_CODES[np.isfinite(decode(ALL_CODES))], 10_001)
    assert kernel(finite) and spec(finite)
    assert kernel(finite[:0]) and kernel(finite.reshape(73, 137))
    for position in (0, 1, 4095, 4096, 4097, 8191, 10_000):
        for bad in (exponent, exponent | 0x8000, exponent | 1, 0xFFFF):
            x = finite.copy()
            x[position] = bad
            assert not kernel(x) and not spec(x), (position, hex(bad))


def test_codes_all_finite_refuses_other_dtypes():
    with pytest.raises(TypeError, match="fp16_all_finite: bits must have dtype uint16"):
        fp16_all_finite(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="bf16_all_finite: bits must be a numpy array"):
        bf16_all_finite([0, 1])
