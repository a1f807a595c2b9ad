"""16-bit floats (IEEE half and bfloat16) emulated on float32 arrays.

Numba has no float16 type on the CPU, so these kernels work on the uint32 bit pattern of each
float32: mixed-precision training rounds through them, and the wire carries their 16-bit codes.
Where the CPU converts float32 to and from half itself (x86 F16C, ARM), the fp16 kernels use
that instruction instead, and keep the bit arithmetic only for NaN payloads.
"""

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.extending import intrinsic

__all__ = [
    "bf16_all_finite",
    "bf16_decode",
    "bf16_encode",
    "fp16_all_finite",
    "fp16_decode",
    "fp16_encode",
    "round_to_bf16",
    "round_to_fp16",
]

# Numba widens integer arithmetic to 64 bits. Wrapping results in u32() keeps them 32 bits
# wide, so LLVM packs twice as many lanes into each vector instruction (about 2x faster).
u32 = np.uint32

# float32 bit-pattern landmarks. A pattern splits into sign and magnitude; for magnitudes,
# integer order is float order, so comparisons below are range checks on the value.
_SIGN = u32(0x80000000)
_MAGNITUDE = u32(0x7FFFFFFF)
_F32_INF = u32(0x7F800000)  # anything above is a NaN
_F32_HALF_BITS = u32(0x3F000000)  # 0.5
_POINT_FIVE = np.float32(0.5)
_TWO_POW_M24 = np.float32(2.0**-24)  # the step between half subnormals

_FP16_MIN_NORMAL = u32(0x38800000)  # 2**-14
_FP16_OVERFLOW = u32(0x47800000)  # 2**16: a rounded magnitude this big is past 65504
_FP16_REBIAS = u32(0x38000000)  # (127 - 15) << 23 moves a float32 exponent to half's bias
_FP16_NAN_MIN = u32(0x7F802000)  # the NaN whose half payload is 1, numpy's fallback

_BF16_NAN = u32(0x7FC0)  # torch's quiet NaN, returned for every NaN input


# --- IEEE half (fp16) -------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _fp16_round_magnitude(a, ax):
    """Round a float32 magnitude to the nearest half value; return that value's float32 bits.

    `a` is |x| as uint32 bits and `ax` the same number as float32. Ties go to even, rounded
    magnitudes of 65520 and up go to inf, NaN keeps the top 10 payload bits and stays NaN
    (numpy's float32 -> float16 rules). Twin: twins.precision.round_to_fp16. Tricks:
    - normal range: round half to even at bit 13 is an integer add (0xFFF plus the lowest
      kept bit) and a mask. A carry out of the significand lands in the exponent field, which
      is the next binade, or the overflow that the last line turns into inf.
    - subnormal range: half's steps there are 2**-24, the float32 ulp at 0.5, so adding 0.5
      makes the FPU round |x| half to even onto that grid, and subtracting 0.5 is exact. (No
      fastmath, which could fold the pair away. Flushing float32 denormals to zero cannot
      change the result: they round to 0 anyway.)
    - the cases are cheap and side-effect free, so LLVM turns the ifs into selects and
      vectorises the loop; run as plain Python, the ifs keep NaN out of the float add.
    """
    if a > _F32_INF:
        # NaN: numpy cuts the payload to half's 10 bits and, if none are left set, sets the
        # lowest. The payload bits sit above the exponent's, so max() does both.
        return max(u32(a & u32(0x7FFFE000)), _FP16_NAN_MIN)
    if a < _FP16_MIN_NORMAL:
        return np.float32((ax + _POINT_FIVE) - _POINT_FIVE).view(np.uint32)
    r = u32((a + u32(0xFFF) + ((a >> u32(13)) & u32(1))) & u32(0x7FFFE000))
    return _F32_INF if r >= _FP16_OVERFLOW else r  # also maps inf to itself


@njit(cache=True, nogil=True)
def _fp16_code(r):
    """The 15-bit half code (no sign) of a float32 magnitude `r` that is already a half value.

    Twin: twins.precision.fp16_encode. Normals move the exponent from bias 127 to bias 15;
    a subnormal is its count of 2**-24 steps, read off as the low bits of r + 0.5 (exact).
    """
    if r >= _F32_INF:
        code = u32(0x7C00) | u32((r >> u32(13)) & u32(0x3FF))  # inf, or NaN with its payload
    elif r >= _FP16_MIN_NORMAL:
        code = u32((r - _FP16_REBIAS) >> u32(13))
    else:
        half_plus_r = np.float32(np.uint32(r).view(np.float32) + _POINT_FIVE)
        code = u32(half_plus_r.view(np.uint32) - _F32_HALF_BITS)
    return code


@njit(cache=True, nogil=True)
def _round_to_fp16_kernel(x, u, out):
    """Inner loop of round_to_fp16: out[i] = float32 bits of the half nearest to x[i].

    `x` and `u` are float32 and uint32 views of the same flat input. Twin:
    twins.precision.round_to_fp16. One pass; the sign bit passes through untouched, so -0.0
    and negative NaNs keep it. Tricks: see _fp16_round_magnitude.
    """
    for i in range(u.size):
        v = u[i]
        r = _fp16_round_magnitude(u32(v & _MAGNITUDE), abs(x[i]))
        out[i] = u32(u32(v & _SIGN) | r)


@njit(cache=True, nogil=True)
def _fp16_encode_kernel(x, u, out):
    """Inner loop of fp16_encode: out[i] = IEEE half code of x[i] (uint16).

    Twin: twins.precision.fp16_encode. Rounds with _fp16_round_magnitude, then packs the
    value into 15 bits with _fp16_code; the sign moves from bit 31 to bit 15.
    """
    for i in range(u.size):
        v = u[i]
        r = _fp16_round_magnitude(u32(v & _MAGNITUDE), abs(x[i]))
        out[i] = u32(u32(u32(v & _SIGN) >> u32(16)) | _fp16_code(r))


@njit(cache=True, nogil=True)
def _fp16_bits(h):
    """The float32 bits of the half with code h. Exact, NaN payloads kept.

    Twin: twins.precision.fp16_decode. Tricks: normals and inf/NaN are bit moves; a subnormal
    half is c * 2**-24 with c < 1024, which float32 holds exactly, so an int-to-float
    conversion and a multiply normalise it (no leading-zero count).
    """
    v = u32(h)
    c = u32(v & u32(0x7FFF))
    if c >= u32(0x7C00):
        bits = _F32_INF | u32((c & u32(0x3FF)) << u32(13))
    elif c >= u32(0x0400):
        bits = u32((c << u32(13)) + _FP16_REBIAS)
    else:
        bits = np.float32(np.float32(c) * _TWO_POW_M24).view(np.uint32)
    return u32(u32(u32(v & u32(0x8000)) << u32(16)) | bits)


@njit(cache=True, nogil=True)
def _fp16_decode_kernel(h, out):
    """Inner loop of fp16_decode: out[i] = float32 bits of the half with code h[i].

    Twin: twins.precision.fp16_decode. One pass; see _fp16_bits.
    """
    for i in range(h.size):
        out[i] = _fp16_bits(h[i])


# --- IEEE half in hardware --------------------------------------------------------------------


def _has_half_conversions() -> bool:
    """Does this CPU convert float32 <-> half in one instruction? Without it LLVM would call a
    runtime routine that Numba does not link; and with the JIT off there is no LLVM at all."""
    if config.DISABLE_JIT:
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("f16c")) or llvm.get_process_triple().startswith("aarch64")


@intrinsic
def _half_code(typingctx, x):
    """The half nearest to float32 x (ties to even, by the FPU), as its uint16 code."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _half_value(typingctx, code):
    """The float32 value of a half's uint16 code (exact)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(cache=True, nogil=True)
def _fp16_nan_code(v):
    """numpy's half code for the float32 NaN with bits v: top 10 payload bits, lowest set if
    none are (the FPU instead sets the quiet bit, which would differ from numpy)."""
    return u32(u32(u32(v & _SIGN) >> u32(16)) | u32(0x7C00)
               | max(u32((v >> u32(13)) & u32(0x3FF)), u32(1)))


@njit(cache=True, nogil=True)
def _fp16_encode_hw(x, u, out):
    """fp16_encode by the FPU's conversion; NaNs by numpy's rule. Twin:
    twins.precision.fp16_encode. Both sides of the select are cheap, so it vectorises."""
    for i in range(u.size):
        v = u[i]
        code = u32(_half_code(x[i]))
        out[i] = _fp16_nan_code(v) if u32(v & _MAGNITUDE) > _F32_INF else code


@njit(cache=True, nogil=True)
def _round_to_fp16_hw(x, u, out):
    """round_to_fp16 by the FPU's two conversions; NaNs by numpy's rule. Twin:
    twins.precision.round_to_fp16."""
    for i in range(u.size):
        v = u[i]
        a = u32(v & _MAGNITUDE)
        bits = np.float32(_half_value(_half_code(x[i]))).view(np.uint32)
        nan = u32(u32(v & _SIGN) | max(u32(a & u32(0x7FFFE000)), _FP16_NAN_MIN))
        out[i] = nan if a > _F32_INF else bits


@njit(cache=True, nogil=True)
def _fp16_bits_hw(h):
    """_fp16_bits by the FPU's conversion; NaN payloads kept as they are (the FPU would set
    the quiet bit). Twin: twins.precision.fp16_decode. Both sides of the select are cheap,
    so a loop over it vectorises."""
    v = u32(h)
    c = u32(v & u32(0x7FFF))
    nan = u32(u32(u32(v & u32(0x8000)) << u32(16)) | _F32_INF
              | u32((c & u32(0x3FF)) << u32(13)))
    bits = np.float32(_half_value(h)).view(np.uint32)
    return nan if c > u32(0x7C00) else bits


@njit(cache=True, nogil=True)
def _fp16_decode_hw(h, out):
    """fp16_decode by the FPU's conversion (see _fp16_bits_hw). Twin:
    twins.precision.fp16_decode."""
    for i in range(h.size):
        out[i] = _fp16_bits_hw(h[i])


HARDWARE_HALF = _has_half_conversions()
_ROUND_TO_FP16 = _round_to_fp16_hw if HARDWARE_HALF else _round_to_fp16_kernel
_FP16_ENCODE = _fp16_encode_hw if HARDWARE_HALF else _fp16_encode_kernel
_FP16_DECODE = _fp16_decode_hw if HARDWARE_HALF else _fp16_decode_kernel


# --- bfloat16 ---------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _bf16_code(v):
    """bfloat16 code of float32 bits `v`, as torch's c10::round_to_nearest_even computes it.

    Twin: twins.precision.bf16_encode. Trick: bfloat16 is the top half of a float32, so round
    half to even is one integer add on the whole pattern (0x7FFF plus the lowest kept bit) and
    a shift; a carry walks into the exponent: the next binade, or inf past the largest finite.
    Subnormals and the sign need no special case. NaN becomes torch's positive quiet 0x7FC0.
    """
    if u32(v & _MAGNITUDE) > _F32_INF:
        return _BF16_NAN
    return u32(u32(v + u32(0x7FFF) + ((v >> u32(16)) & u32(1))) >> u32(16))


@njit(cache=True, nogil=True)
def _round_to_bf16_kernel(u, out):
    """Inner loop of round_to_bf16: out[i] = float32 bits of the bfloat16 nearest u[i].

    Twin: twins.precision.round_to_bf16. One pass, integer only; see _bf16_code.
    """
    for i in range(u.size):
        out[i] = u32(_bf16_code(u[i]) << u32(16))


@njit(cache=True, nogil=True)
def _bf16_encode_kernel(u, out):
    """Inner loop of bf16_encode: out[i] = bfloat16 code of float32 bits u[i].

    Twin: twins.precision.bf16_encode. One pass, integer only; see _bf16_code.
    """
    for i in range(u.size):
        out[i] = _bf16_code(u[i])


@njit(cache=True, nogil=True)
def _bf16_bits(h):
    """The float32 bits of the bfloat16 with code h: h << 16. Exact; NaN payloads and signs
    survive. Twin: twins.precision.bf16_decode."""
    return u32(u32(h) << u32(16))


@njit(cache=True, nogil=True)
def _bf16_decode_kernel(h, out):
    """Inner loop of bf16_decode: out[i] = h[i] << 16, the float32 bits of a bfloat16 code.

    Twin: twins.precision.bf16_decode. One pass; see _bf16_bits.
    """
    for i in range(h.size):
        out[i] = _bf16_bits(h[i])


# --- finiteness, read off the codes ----------------------------------------------------------

_CHUNK = 4096  # codes scanned between early exits: long enough to vectorise, short to stop
_FP16_EXPONENT = u32(0x7C00)  # a half is inf or NaN exactly when these bits are all ones
_BF16_EXPONENT = u32(0x7F80)  # as a float32's top half: the same rule


@njit(cache=True, nogil=True)
def _codes_finite_kernel(bits, exponent):
    """True when no uint16 code in `bits` (flat) has all of its `exponent` bits set.

    Twin: twins.precision.fp16_all_finite / bf16_all_finite. Reads the 16-bit codes, half the
    bytes of their float32 values. Tricks as kernels.norms.all_finite: an integer max of
    (code & exponent) over a chunk decides it and vectorises; exit per chunk.
    """
    for c0 in range(0, bits.size, _CHUNK):
        chunk = bits[c0 : c0 + _CHUNK]  # indexed from 0: no wraparound checks, plain loads
        worst = u32(0)
        for i in range(chunk.size):
            worst = max(worst, u32(u32(chunk[i]) & exponent))
        if worst == exponent:
            return False
    return True


# --- public functions -------------------------------------------------------------------------


def _flat(x: np.ndarray, want: type, name: str, func: str) -> np.ndarray:
    """Check that x is an array of dtype `want`; return it flat and C-contiguous."""
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{func}: {name} must be a numpy array of {np.dtype(want)}, got {type(x).__name__}")
    if x.dtype != want:
        hint = ""
        if x.dtype == np.float64 and want == np.float32:
            hint = (" (not converted for you: float64 -> float32 -> 16 bits rounds twice, which"
                    " can differ from rounding once; call .astype(np.float32) if you accept that)")
        elif x.dtype == np.float16:
            hint = " (to decode a float16 array's bits, pass .view(np.uint16))"
        raise TypeError(f"{func}: {name} must have dtype {np.dtype(want)}, got {x.dtype}{hint}")
    return np.ascontiguousarray(x).reshape(-1)  # copies only non-contiguous views


def _codes_out(out: np.ndarray | None, x: np.ndarray, func: str) -> np.ndarray:
    """A new uint16 array shaped like x, or `out` once checked: an encoder writes into it
    in place, so it must be writable, contiguous uint16 with one element per value."""
    if out is None:
        return np.empty(x.shape, np.uint16)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint16:
        got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
        raise TypeError(f"{func}: out must be a numpy array of uint16, got {got}")
    if out.size != x.size or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{func}: out must be a writable, C-contiguous array of {x.size} "
                         f"elements (x's size), got {out.size} elements, "
                         f"contiguous={out.flags.c_contiguous}, writable={out.flags.writeable}")
    return out


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """Round float32 `x` to the nearest IEEE half values; returns a new float32 array.

    Bit for bit `x.astype(np.float16).astype(np.float32)`, NaN payloads included: ties to
    even, |x| >= 65520 -> inf, subnormals kept, sign of zero kept. Any shape; float32 only.
    """
    flat = _flat(x, np.float32, "x", "round_to_fp16")
    out = np.empty(x.shape, np.float32)
    _ROUND_TO_FP16(flat, flat.view(np.uint32), out.reshape(-1).view(np.uint32))
    return out


def fp16_encode(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """IEEE half codes of float32 `x` as uint16: `x.astype(np.float16).view(np.uint16)`.

    out: a uint16 array of x's size to write the codes into (say, the part of a message or a
    mailbox that carries them), instead of a new array; returned.
    """
    flat = _flat(x, np.float32, "x", "fp16_encode")
    out = _codes_out(out, x, "fp16_encode")
    _FP16_ENCODE(flat, flat.view(np.uint32), out.reshape(-1))
    return out


def fp16_decode(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 half codes: `bits.view(np.float16).astype(np.float32)`."""
    flat = _flat(bits, np.uint16, "bits", "fp16_decode")
    out = np.empty(bits.shape, np.float32)
    _FP16_DECODE(flat, out.reshape(-1).view(np.uint32))
    return out


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 `x` to the nearest bfloat16 values; returns a new float32 array.

    Ties to even, as torch converts: finite values past the largest bfloat16 round to inf,
    and every NaN becomes the positive quiet NaN 0x7FC00000 (sign and payload dropped).
    """
    flat = _flat(x, np.float32, "x", "round_to_bf16")
    out = np.empty(x.shape, np.float32)
    _round_to_bf16_kernel(flat.view(np.uint32), out.reshape(-1).view(np.uint32))
    return out


def bf16_encode(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 codes of float32 `x` as uint16, rounded as round_to_bf16 rounds.

    out: a uint16 array of x's size to write the codes into, instead of a new array; returned.
    """
    flat = _flat(x, np.float32, "x", "bf16_encode")
    out = _codes_out(out, x, "bf16_encode")
    _bf16_encode_kernel(flat.view(np.uint32), out.reshape(-1))
    return out


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 bfloat16 codes (each code is the top half of a float32)."""
    flat = _flat(bits, np.uint16, "bits", "bf16_decode")
    out = np.empty(bits.shape, np.float32)
    _bf16_decode_kernel(flat, out.reshape(-1).view(np.uint32))
    return out


def fp16_all_finite(bits: np.ndarray) -> bool:
    """True when no uint16 half code in `bits` (any shape) is inf or NaN: what
    `np.isfinite(fp16_decode(bits)).all()` says, without decoding."""
    flat = _flat(bits, np.uint16, "bits", "fp16_all_finite")
    return bool(_codes_finite_kernel(flat, _FP16_EXPONENT))


def bf16_all_finite(bits: np.ndarray) -> bool:
    """True when no uint16 bfloat16 code in `bits` (any shape) is inf or NaN: what
    `np.isfinite(bf16_decode(bits)).all()` says, without decoding."""
    flat = _flat(bits, np.uint16, "bits", "bf16_all_finite")
    return bool(_codes_finite_kernel(flat, _BF16_EXPONENT))
