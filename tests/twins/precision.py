"""Plain-NumPy twins of kernels/precision.py: the specification, written to be obviously right.

fp16 is NumPy's own float16 cast. bf16 is derived independently by rounding in float64
arithmetic; torch_bf16_encode spells out torch's integer formula so the tests can check the two.
"""

import numpy as np

# --- IEEE half ---------------------------------------------------------------------------------


def round_to_fp16(x):
    """float32 -> nearest half -> float32, by NumPy's cast (NaN payloads included)."""
    with np.errstate(over="ignore"):  # |x| >= 65520 becomes inf, as it should
        return x.astype(np.float16).astype(np.float32)


def fp16_encode(x):
    """float32 -> uint16 half codes, by NumPy's cast."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16).view(np.uint16)


def fp16_decode(bits):
    """uint16 half codes -> float32, by NumPy's cast."""
    return bits.view(np.float16).astype(np.float32)


def round_to_nearest_even(x, significant_bits, min_exponent):
    """Round float32 `x` to `significant_bits` bits in float64 arithmetic, ties to even.

    `min_exponent` is the exponent of the format's smallest subnormal step. Each value is
    split as m * 2**e with 0.5 <= |m| < 1 (np.frexp); its step is 2**(e - significant_bits),
    never below 2**min_exponent. Dividing by a power of two, np.rint (which rounds half to
    even) and multiplying back are all exact in float64, so the one rounding is np.rint's.
    Infinities pass through; NaN comes out as some NaN; no overflow handling.
    """
    with np.errstate(invalid="ignore"):  # signalling NaNs complain; they stay NaN
        x64 = x.astype(np.float64)
        _, e = np.frexp(x64)
        step = np.ldexp(1.0, np.maximum(e - significant_bits, min_exponent))
        return np.asarray(np.rint(x64 / step) * step)  # an array even for 0-d x


def round_to_fp16_by_float64(x):
    """Independent derivation of round_to_fp16 for non-NaN x: the tests check it on NumPy.

    Half keeps 11 significant bits, steps no smaller than 2**-24, and its largest finite value
    is 65504: anything that rounds to 2**16 or beyond is inf.
    """
    r = round_to_nearest_even(x, 11, -24)
    r = np.where(np.abs(r) >= 2.0**16, np.copysign(np.inf, r), r)
    return r.astype(np.float32)


# --- bfloat16 ----------------------------------------------------------------------------------

BF16_NAN = np.uint16(0x7FC0)  # torch's quiet NaN: every NaN input becomes this


def round_to_bf16(x):
    """float32 -> nearest bfloat16 -> float32, by float64 arithmetic.

    bfloat16 is float32 with 8 significant bits: same exponent range, so its smallest step is
    2**-149 * 2**16 = 2**-133, and a value that rounds past the largest finite one
    ((2 - 2**-7) * 2**127) reaches 2**128, which the cast to float32 turns into inf.
    """
    with np.errstate(over="ignore"):
        out = round_to_nearest_even(x, 8, -133).astype(np.float32)
    out.view(np.uint32)[np.isnan(x)] = np.uint32(BF16_NAN) << 16  # bits, so the payload is exact
    return out


def bf16_encode(x):
    """float32 -> uint16 bfloat16 codes: the top half of round_to_bf16's float32 bits."""
    return (round_to_bf16(x).view(np.uint32) >> 16).astype(np.uint16)


def bf16_decode(bits):
    """uint16 bfloat16 codes -> float32: the code becomes the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def torch_bf16_encode(x):
    """torch's c10::round_to_nearest_even, transcribed: NaN -> 0x7FC0, otherwise add 0x7FFF
    plus the lowest kept bit to the float32 bits and keep the top 16 (in uint64: no wrap)."""
    bits = x.view(np.uint32).astype(np.uint64)
    code = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), BF16_NAN, code).astype(np.uint16)


# --- finiteness of codes -----------------------------------------------------------------------


def fp16_all_finite(bits):
    """Are all the half codes finite? Decode them and ask NumPy."""
    return bool(np.all(np.isfinite(fp16_decode(bits))))


def bf16_all_finite(bits):
    """Are all the bfloat16 codes finite? Decode them and ask NumPy."""
    return bool(np.all(np.isfinite(bf16_decode(bits))))
