"""Optimizer updates: SGD (momentum, Nesterov, weight decay) and Adam (or AdamW), in place.

The arithmetic follows PyTorch's single-tensor CPU paths step by step (torch.optim.SGD with
dampening=0, torch.optim.Adam and AdamW without amsgrad), so a tinyps server trains like a torch
loop: SGD matches torch 2.13 on an AVX2/AVX-512 CPU bit for bit, Adam to within torch's sqrt.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["adam_update", "amax", "sgd_update"]


# ---------------------------------------------------------------------------------------------
# Fused multiply-add. torch's vectorised CPU kernels compute add(x, y, alpha), lerp and addcmul
# with an FMA instruction (one rounding for a*b + c), so matching torch bit for bit needs one.


def _fma32(a, b, c):
    """float32 a*b + c rounded once. This Python body runs only under NUMBA_DISABLE_JIT=1.

    Twin: twins.optim.fma32 (the same steps on arrays). Trick: a*b is exact in float64
    (24+24 bits <= 53); the sum is rounded to odd in float64, which then rounds to float32
    correctly (Boldo and Melquiond, IEEE Trans. Computers 57(4), 2008).
    """
    p = float(a) * float(b)
    s = p + float(c)
    if math.isfinite(s):
        bb = s - p
        e = (p - (s - bb)) + (float(c) - bb)  # TwoSum: s + e == p + c exactly
        if e != 0.0 and int(np.float64(s).view(np.int64)) & 1 == 0:
            s = math.nextafter(s, math.copysign(math.inf, e))
    with np.errstate(over="ignore"):  # rounding past float32's range gives inf, as the FMA does
        return np.float32(s)


@intrinsic
def _llvm_fma(typingctx, a, b, c):
    # llvm.fma: one instruction where the CPU has FMA, a correct libm call where it has not.
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@overload(_fma32, jit_options={"cache": True})
def _fma32_jit(a, b, c):
    def impl(a, b, c):
        return _llvm_fma(a, b, c)

    return impl


# ---------------------------------------------------------------------------------------------
# Checks shared by both updates: every one runs before any array is written.


def _check_array(name: str, a: object, like: np.ndarray | None = None) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if like is not None and a.shape != like.shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {like.shape} (the param's shape)")


def _check_writable(name: str, a: np.ndarray) -> None:
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")


def _check_no_overlap(named: dict[str, np.ndarray]) -> None:
    # The kernels read and write element i in one pass: overlapping arrays would see
    # half-updated values. Contiguous arrays overlap exactly when their bounds do.
    items = list(named.items())
    for k, (name_a, a) in enumerate(items):
        for name_b, b in items[k + 1 :]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_a} and {name_b} share memory; they must be separate")


def _check_scalar(name: str, value: object, low: float, high: float | None = None) -> float:
    """Return value as a float, or raise naming it: low <= value (< high when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < low or (high is not None and v >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


# ---------------------------------------------------------------------------------------------
# SGD. Each update kernel has two passes, chosen by flags: `check` computes every new value and
# answers False at the first inf or NaN, writing nothing; `store` writes them. A server checks
# then stores, so that an update that would overflow is never half applied.

_CHUNK = 4096  # elements checked between early exits: long enough to vectorise
_MAX = np.float32(np.finfo(np.float32).max)  # |x| <= _MAX: x is finite (NaN compares False)
_ZERO = np.float32(0.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_values(p, g, b, neg_lr, momentum, weight_decay, use_wd, use_momentum, nesterov):
    """One element of an SGD step: the new (param, buf), buf unchanged without momentum.

    Per element and in float32, torch's order (fma = one rounding, as torch's vectorised add
    with alpha):
        g = fma(param, wd, grad)       grad.add(param, alpha=wd), only when use_wd (wd == 0
                                       must leave -0.0 and inf alone, as torch skips it)
        buf = buf*momentum + g         buf.mul_(momentum).add_(g): two roundings
        g = fma(buf, momentum, g) if nesterov else buf
        param = fma(g, -lr, param)     param.add_(g, alpha=-lr)
    """
    if use_wd:
        g = _fma32(p, weight_decay, g)
    if use_momentum:
        b = b * momentum + g
        g = _fma32(b, momentum, g) if nesterov else b
    return _fma32(g, neg_lr, p), b


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_kernel(param, grad, buf, neg_lr, momentum, weight_decay, use_wd, use_momentum,
                nesterov, check, store):
    """One SGD step over flat float32 arrays (_sgd_values per element), in place on param,
    and buf when use_momentum; False, with nothing written, when `check` finds a new value
    inf or NaN. check: compute every new value first; store: write them.

    Twin: twins.optim.sgd_update (check: twins.optim.checked). Tricks: no temporaries; every
    scalar arrives as float32 so no term is promoted to float64; the flags are loop-invariant
    branches; the check pass stores nothing, so it vectorises, and exits per chunk; both
    passes compute with the one _sgd_values, so what the check saw is what is stored.
    """
    if check:
        for c0 in range(0, param.size, _CHUNK):
            # Slices indexed from 0: Numba drops its wraparound arithmetic (see norms.py).
            pc = param[c0 : c0 + _CHUNK]
            gc = grad[c0 : c0 + _CHUNK]
            bc = buf[c0 : c0 + _CHUNK] if use_momentum else pc
            bad = False
            for i in range(pc.size):
                p, b = _sgd_values(pc[i], gc[i], bc[i], neg_lr, momentum, weight_decay,
                                   use_wd, use_momentum, nesterov)
                bad |= not (abs(p) <= _MAX and abs(b) <= _MAX)  # NaN fails <= too
            if bad:
                return False
    if store:
        for i in range(param.size):
            p, b = _sgd_values(param[i], grad[i], buf[i] if use_momentum else _ZERO, neg_lr,
                               momentum, weight_decay, use_wd, use_momentum, nesterov)
            if use_momentum:
                buf[i] = b
            param[i] = p
    return True


def _passes(keep_finite: bool, dry_run: bool) -> tuple[bool, bool]:
    """(check, store) for a kernel: keep_finite checks then stores, dry_run only checks."""
    for name, flag in (("keep_finite", keep_finite), ("dry_run", dry_run)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return bool(keep_finite or dry_run), not dry_run


def sgd_update(
    param: np.ndarray,
    grad: np.ndarray,
    lr: float,
    momentum: float = 0.0,
    buf: np.ndarray | None = None,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    keep_finite: bool = False,
    dry_run: bool = False,
) -> bool:
    """One torch.optim.SGD step (dampening=0, maximize=False), in place on param (and buf).

    param, grad, buf: float32, C-contiguous, same shape, not overlapping. buf is the momentum
    buffer, required when momentum > 0 and ignored when momentum == 0.

    First step: torch sets buf = grad.clone(); here the caller passes a buffer that makes
    momentum*buf + g equal g. np.full_like(param, -0.0) does so bit for bit (-0.0*m + g == g
    for every g, NaN and -0.0 included). np.zeros_like(param) does too, except that a gradient
    of -0.0 becomes +0.0 in buf (+0.0 + -0.0 == +0.0), a difference in the sign of a zero only.

    Returns whether the step was written. keep_finite: write it only if every new value (param,
    buf) is finite, else nothing (a server's weights never turn inf or NaN); dry_run: write
    nothing, only say whether the step would keep every value finite. Neither (torch's way):
    always written, inf and NaN carried through; True.

    Raises TypeError/ValueError naming the bad argument before anything is written:
    lr, momentum, weight_decay must be finite and >= 0; nesterov needs momentum > 0.
    """
    check, store = _passes(keep_finite, dry_run)
    _check_array("param", param)
    _check_array("grad", grad, like=param)
    lr = _check_scalar("lr", lr, 0.0)
    momentum = _check_scalar("momentum", momentum, 0.0)
    weight_decay = _check_scalar("weight_decay", weight_decay, 0.0)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov momentum requires momentum > 0 (as torch.optim.SGD)")
    use_momentum = momentum != 0.0
    if store:
        _check_writable("param", param)
    arrays = {"param": param, "grad": grad}
    if use_momentum:
        if buf is None:
            raise ValueError(
                "momentum > 0 needs a momentum buffer: pass buf=np.full_like(param, -0.0) "
                "on the first step and the same array afterwards"
            )
        _check_array("buf", buf, like=param)
        if store:
            _check_writable("buf", buf)
        arrays["buf"] = buf
    _check_no_overlap(arrays)
    if param.size == 0:
        return True
    flat_buf = buf.reshape(-1) if use_momentum else param.reshape(-1)[:0]
    # torch casts each scalar to the tensor's dtype before the elementwise op: float32 here.
    return bool(_sgd_kernel(
        param.reshape(-1),
        grad.reshape(-1),
        flat_buf,
        np.float32(-lr),
        np.float32(momentum),
        np.float32(weight_decay),
        weight_decay != 0.0,
        use_momentum,
        bool(nesterov),
        check,
        store,
    ))


# ---------------------------------------------------------------------------------------------
# Adam


@njit(cache=True, nogil=True, error_model="numpy")
def _adam_values(p, g, m, v, weight_decay, use_wd, decay, use_decay, w1, w1_minus_1, small_w1,
                 beta2, c2, bc2_sqrt, eps, neg_step_size):
    """One element of an Adam step: the new (param, m, v).

    Per element and in float32, torch's _single_tensor_adam order (fma = one rounding, as
    torch's vectorised kernels):
        param = param * decay                    AdamW: param.mul_(1 - lr*wd), only when use_decay
        g = fma(param, wd, grad)                 grad.add(param, alpha=wd), only when use_wd
        m = fma(g - m, w1, m) if w1 < 0.5 else fma(g - m, w1 - 1, g)
                                                 m.lerp_(g, w1), w1 = 1 - beta1, torch's lerp_vec
        v = fma(c2*g, g, v*beta2)                v.mul_(beta2).addcmul_(g, g, value=c2)
        denom = sqrt(v) / bc2_sqrt + eps         sqrt correctly rounded (torch's is not always)
        param = param + (neg_step_size*m) / denom    addcdiv_: value*t1/t2, left to right
    """
    if use_decay:
        p = p * decay
    if use_wd:
        g = _fma32(p, weight_decay, g)
    d = g - m
    m = _fma32(d, w1, m) if small_w1 else _fma32(d, w1_minus_1, g)
    v = _fma32(c2 * g, g, v * beta2)
    denom = np.sqrt(v) / bc2_sqrt + eps
    return p + (neg_step_size * m) / denom, m, v


@njit(cache=True, nogil=True, error_model="numpy")
def _adam_kernel(param, grad, m, v, weight_decay, use_wd, decay, use_decay, w1, w1_minus_1,
                 small_w1, beta2, c2, bc2_sqrt, eps, neg_step_size, check, store):
    """One Adam step over flat float32 arrays (_adam_values per element), in place on param,
    m, v; False, with nothing written, when `check` finds a new value inf or NaN (the passes
    as in _sgd_kernel).

    Twin: twins.optim.adam_update. Tricks: no temporaries, float32 scalars precomputed in
    Python (float64, as torch does) so nothing is promoted; error_model="numpy" lets 0/0 give
    NaN (eps=0, v=0) instead of raising, and lets the loop vectorise.
    """
    if check:
        for c0 in range(0, param.size, _CHUNK):
            pc = param[c0 : c0 + _CHUNK]
            gc = grad[c0 : c0 + _CHUNK]
            mc = m[c0 : c0 + _CHUNK]
            vc = v[c0 : c0 + _CHUNK]
            bad = False
            for i in range(pc.size):
                p, mi, vi = _adam_values(pc[i], gc[i], mc[i], vc[i], weight_decay, use_wd,
                                         decay, use_decay, w1, w1_minus_1, small_w1, beta2, c2,
                                         bc2_sqrt, eps, neg_step_size)
                bad |= not (abs(p) <= _MAX and abs(mi) <= _MAX and vi <= _MAX)  # v >= 0
            if bad:
                return False
    if store:
        for i in range(param.size):
            p, mi, vi = _adam_values(param[i], grad[i], m[i], v[i], weight_decay, use_wd,
                                     decay, use_decay, w1, w1_minus_1, small_w1, beta2, c2,
                                     bc2_sqrt, eps, neg_step_size)
            m[i] = mi
            v[i] = vi
            param[i] = p
    return True


def adam_update(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    decoupled: bool = False,
    keep_finite: bool = False,
    dry_run: bool = False,
) -> bool:
    """One torch.optim.Adam step (amsgrad=False, L2 weight decay), in place on param, m, v;
    decoupled: torch.optim.AdamW's instead (param *= 1 - lr*weight_decay first, no L2).

    param, grad, m, v: float32, C-contiguous, same shape, not overlapping; m and v start as
    zeros (as torch's exp_avg and exp_avg_sq). step counts this update from 1, as torch's
    state["step"] after its increment. Bias corrections and the step size are Python floats
    (float64), as in torch; every elementwise operation is float32. Returns whether the step
    was written; keep_finite (param, m and v all finite, or nothing written) and dry_run as
    in sgd_update.

    Raises TypeError/ValueError naming the bad argument before anything is written:
    step an int >= 1; lr, eps, weight_decay finite and >= 0; beta1, beta2 in [0, 1).
    """
    check, store = _passes(keep_finite, dry_run)
    _check_array("param", param)
    _check_array("grad", grad, like=param)
    _check_array("m", m, like=param)
    _check_array("v", v, like=param)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the first update is step 1), got {step}")
    lr = _check_scalar("lr", lr, 0.0)
    beta1 = _check_scalar("beta1", beta1, 0.0, 1.0)
    beta2 = _check_scalar("beta2", beta2, 0.0, 1.0)
    eps = _check_scalar("eps", eps, 0.0)
    weight_decay = _check_scalar("weight_decay", weight_decay, 0.0)
    if store:
        for name, a in (("param", param), ("m", m), ("v", v)):
            _check_writable(name, a)
    _check_no_overlap({"param": param, "grad": grad, "m": m, "v": v})
    if param.size == 0:
        return True
    # The scalars as torch computes them (Python floats), then cast to float32 where torch's
    # kernels cast them (Scalar.to<float>() / a wrapped 0-d tensor).
    t = float(step)  # torch's state["step"] is a float tensor read with .item()
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    w1 = np.float32(1 - beta1)
    with np.errstate(over="ignore"):  # a step size past float32 is inf, as in torch
        neg_step_size = np.float32(-step_size)
    return bool(_adam_kernel(
        param.reshape(-1),
        grad.reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        np.float32(weight_decay),
        weight_decay != 0.0 and not decoupled,
        np.float32(1 - lr * weight_decay),  # a Python float, as torch's mul_ takes it
        weight_decay != 0.0 and decoupled,
        w1,
        w1 - np.float32(1),
        bool(abs(w1) < 0.5),  # torch's is_lerp_weight_small
        np.float32(beta2),
        np.float32(1 - beta2),
        np.float32(bias_correction2_sqrt),
        np.float32(eps),
        neg_step_size,
        check,
        store,
    ))


# ---------------------------------------------------------------------------------------------
# The largest magnitude: what a server knows of its weights and state between updates, so that
# most updates are known to stay finite without a check pass (ps/bounds.py).

_ABS_BITS = np.int32(0x7FFFFFFF)  # every bit but the sign


@njit(cache=True, nogil=True)
def _amax_kernel(bits):
    """max |x| over float32 bit patterns (flat int32), as bits. Twin: twins.optim.amax.

    Tricks: as norms._all_finite_kernel, an integer max (the bits of |x| order as |x| does,
    inf and NaN above every finite value), which vectorises where a float max would not.
    """
    worst = np.int32(0)
    for c0 in range(0, bits.size, _CHUNK):
        chunk = bits[c0 : c0 + _CHUNK]
        for i in range(chunk.size):
            worst = max(worst, chunk[i] & _ABS_BITS)
    return worst


def amax(x: np.ndarray) -> float:
    """The largest |x| of a float32 array (0.0 when empty); inf or NaN if x holds one."""
    _check_array("x", x)
    return float(np.int32(_amax_kernel(x.reshape(-1).view(np.int32))).view(np.float32))
