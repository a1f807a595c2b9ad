"""SGD straight from 16-bit codes: plain SGD from a gradient still in fp16/bf16 bit patterns
and a loss scale, bit for bit decode-then-sgd_update, in one pass (kernels/optim.py's passes).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.optim import (
    _CHUNK,
    _MAX,
    _check_array,
    _check_no_overlap,
    _check_scalar,
    _check_writable,
    _fma32,
    _passes,
)
from kernels.precision import HARDWARE_HALF, _bf16_bits, _fp16_bits, _half_value

__all__ = ["sgd_update_codes"]

# SGD straight from 16-bit codes: a parameter server receives fp16/bf16 gradients as their bit
# patterns. Decoding them into a float32 array and then updating writes and reads that array
# once more than needed; these kernels decode each code where the update uses it. Three
# kernels, one per decoder, because the hardware one cannot be compiled where there is no
# F16C (a branch would not keep it out of the machine code), and a kernel made by a factory
# around its decoder is not cached by Numba (each process would compile it again). Each has
# the check and store passes of _sgd_kernel.


@njit(cache=True, nogil=True, error_model="numpy")
def _unscaled(g, scale, use_scale, inv, use_inv):
    """g / scale (use_scale), or g * inv where inv = 1/scale is exact (use_inv), or g."""
    if use_inv:
        return g * inv
    return g / scale if use_scale else g


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_fp16_kernel(param, codes, neg_lr, scale, use_scale, inv, use_inv, check, store):
    """One plain SGD step from half codes, in place on param (flat arrays); False, with
    nothing written, when `check` finds a new value inf or NaN (see _sgd_kernel).

    Per element, in float32: g = decode(code); g = g / scale when use_scale; param =
    fma(g, -lr, param): exactly what fp16_decode, a float32 division and _sgd_kernel (no
    momentum, no weight decay) compute one after the other. Twin: twins.optim.sgd_update_codes.
    Tricks: one pass, no float32 gradient array; the decode is precision._fp16_bits (bit
    arithmetic); a division, not a multiply by 1/scale, which would round differently, unless
    the scale is a power of two (use_inv, inv = 1/scale: then both are exact scalings, the same
    bits, and the multiply is several times cheaper).
    """
    if check:
        for c0 in range(0, param.size, _CHUNK):
            pc = param[c0 : c0 + _CHUNK]
            cc = codes[c0 : c0 + _CHUNK]
            bad = False
            for i in range(pc.size):
                g = np.uint32(_fp16_bits(cc[i])).view(np.float32)
                g = _unscaled(g, scale, use_scale, inv, use_inv)
                bad |= not abs(_fma32(g, neg_lr, pc[i])) <= _MAX
            if bad:
                return False
    if store:
        for i in range(param.size):
            g = np.uint32(_fp16_bits(codes[i])).view(np.float32)
            param[i] = _fma32(_unscaled(g, scale, use_scale, inv, use_inv), neg_lr, param[i])
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_fp16_hw_kernel(param, codes, neg_lr, scale, use_scale, inv, use_inv, check, store):
    """_sgd_fp16_kernel with the FPU's half conversion alone (precision._half_value).

    Unlike fp16_decode, the conversion sets a NaN's quiet bit; that cannot show here, because
    the division and the fma set it too (keeping sign and payload), whichever decoder ran. So
    the kernel skips the NaN fix-up that _fp16_bits_hw needs: about 15% less time per step.
    """
    if check:
        for c0 in range(0, param.size, _CHUNK):
            pc = param[c0 : c0 + _CHUNK]
            cc = codes[c0 : c0 + _CHUNK]
            bad = False
            for i in range(pc.size):
                g = _half_value(cc[i])
                g = _unscaled(g, scale, use_scale, inv, use_inv)
                bad |= not abs(_fma32(g, neg_lr, pc[i])) <= _MAX
            if bad:
                return False
    if store:
        for i in range(param.size):
            g = _half_value(codes[i])
            param[i] = _fma32(_unscaled(g, scale, use_scale, inv, use_inv), neg_lr, param[i])
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_bf16_kernel(param, codes, neg_lr, scale, use_scale, inv, use_inv, check, store):
    """_sgd_fp16_kernel for bfloat16 codes (precision._bf16_bits: a shift)."""
    if check:
        for c0 in range(0, param.size, _CHUNK):
            pc = param[c0 : c0 + _CHUNK]
            cc = codes[c0 : c0 + _CHUNK]
            bad = False
            for i in range(pc.size):
                g = np.uint32(_bf16_bits(cc[i])).view(np.float32)
                g = _unscaled(g, scale, use_scale, inv, use_inv)
                bad |= not abs(_fma32(g, neg_lr, pc[i])) <= _MAX
            if bad:
                return False
    if store:
        for i in range(param.size):
            g = np.uint32(_bf16_bits(codes[i])).view(np.float32)
            param[i] = _fma32(_unscaled(g, scale, use_scale, inv, use_inv), neg_lr, param[i])
    return True


_SGD_CODES = {"float16": _sgd_fp16_hw_kernel if HARDWARE_HALF else _sgd_fp16_kernel,
              "bfloat16": _sgd_bf16_kernel}


def sgd_update_codes(
    param: np.ndarray, codes: np.ndarray, fmt: str, lr: float, scale: float = 1.0, *,
    keep_finite: bool = False, dry_run: bool = False,
) -> bool:
    """One plain SGD step (no momentum, no weight decay) from a gradient still in 16-bit codes.

    Bit for bit `sgd_update(param, g, lr)` with g = fp16_decode(codes) (fmt "float16") or
    bf16_decode(codes) ("bfloat16"), divided by np.float32(scale) first when scale != 1 (a
    loss scale, divided out in float32 as GradScaler does); but in one pass, without the
    float32 gradient. param: float32, C-contiguous, writable; codes: uint16 of param's shape.
    Returns whether the step was written; keep_finite and dry_run as in sgd_update.

    Raises TypeError/ValueError naming the bad argument before anything is written: lr finite
    and >= 0, scale finite and > 0.
    """
    check, store = _passes(keep_finite, dry_run)
    _check_array("param", param)
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"codes must be a numpy.ndarray, got {type(codes).__name__}")
    if codes.dtype != np.uint16:
        raise TypeError(f"codes must be uint16 (16-bit float codes), got {codes.dtype}")
    if not codes.flags.c_contiguous:
        raise ValueError("codes must be C-contiguous (use np.ascontiguousarray)")
    if codes.shape != param.shape:
        raise ValueError(f"codes has shape {codes.shape}, expected {param.shape} (the param's "
                         f"shape)")
    kernel = _SGD_CODES.get(fmt)
    if kernel is None:
        raise ValueError(f"fmt must be one of {', '.join(_SGD_CODES)}, got {fmt!r}")
    lr = _check_scalar("lr", lr, 0.0)
    scale = _check_scalar("scale", scale, 0.0)
    if scale == 0.0:
        raise ValueError("scale must be > 0, got 0.0")
    if store:
        _check_writable("param", param)
    _check_no_overlap({"param": param, "codes": codes})
    if param.size == 0:
        return True
    inv = _exact_inverse(scale)
    return bool(kernel(param.reshape(-1), codes.reshape(-1), np.float32(-lr),
                       np.float32(scale), scale != 1.0, np.float32(inv or 1.0),
                       inv is not None and scale != 1.0, check, store))


def _exact_inverse(scale: float) -> float | None:
    """1/scale when scale is a power of two whose inverse is a normal float32 (a loss scaler's
    scales are), so that g * (1/scale) is g / scale bit for bit; else None."""
    inv = 1.0 / scale
    if (math.frexp(scale)[0] == 0.5 and float(np.float32(scale)) == scale
            and 2.0**-126 <= inv <= 2.0**127):
        return inv
    return None
