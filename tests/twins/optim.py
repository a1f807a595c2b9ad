"""Plain-NumPy twins of kernels/optim.py and optim_codes.py: the specification, written to be
obviously right.

Each line is one line of torch's _single_tensor_sgd / _single_tensor_adam, in float32, with
each Python scalar cast to float32 where torch's kernel casts it, and fma32 where torch's
vectorised CPU kernel uses a fused multiply-add. No checks: the kernels check.
"""

import numpy as np

from twins import precision

__all__ = ["adam_update", "amax", "checked", "fma32", "sgd_update", "sgd_update_codes"]

f32 = np.float32


def fma32(a, b, c):
    """float32 a*b + c with a single rounding (what the FMA instruction computes).

    a*b is exact in float64 (24+24 bits <= 53). s = a*b + c is rounded to nearest in float64;
    TwoSum gives the error e exactly; rounding to odd (move an inexact, even s one ulp toward
    the exact value) and then to float32 is correctly rounded: Boldo and Melquiond, "Emulation
    of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE Trans.
    Computers 57(4), 2008.
    """
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    with np.errstate(invalid="ignore", over="ignore"):
        p = a * b
        s = p + c
        bb = s - p
        e = (p - (s - bb)) + (c - bb)  # TwoSum: s + e == p + c exactly
        even = (np.asarray(s).view(np.int64) & 1) == 0
        to_odd = np.isfinite(s) & (e != 0) & even
        s = np.where(to_odd, np.nextafter(s, np.copysign(np.inf, e)), s)
        return s.astype(np.float32)


def sgd_update(param, grad, lr, momentum=0.0, buf=None, weight_decay=0.0, nesterov=False):
    g = grad
    if weight_decay != 0:
        g = fma32(param, f32(weight_decay), g)  # grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf[...] = buf * f32(momentum) + g  # buf.mul_(momentum).add_(grad)
        g = fma32(buf, f32(momentum), g) if nesterov else buf  # grad.add(buf, alpha=momentum)
    param[...] = fma32(g, f32(-lr), param)  # param.add_(grad, alpha=-lr)


def sgd_update_codes(param, codes, fmt, lr, scale=1.0):
    """What a server did before it fused the steps: decode the 16-bit codes to float32,
    divide the loss scale out in float32 (GradScaler's unscale), one plain SGD step."""
    grad = precision.fp16_decode(codes) if fmt == "float16" else precision.bf16_decode(codes)
    if scale != 1.0:
        with np.errstate(all="ignore"):
            grad = grad / f32(scale)
    sgd_update(param, grad, lr)


def adam_update(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled=False):
    g = grad
    if weight_decay != 0 and decoupled:
        param[...] = param * f32(1 - lr * weight_decay)  # AdamW: param.mul_(1 - lr*wd)
    elif weight_decay != 0:
        g = fma32(param, f32(weight_decay), g)  # grad.add(param, alpha=weight_decay)
    w = f32(1 - beta1)  # exp_avg.lerp_(grad, 1 - beta1), as torch's lerp_vec
    if abs(w) < 0.5:
        m[...] = fma32(g - m, w, m)
    else:
        m[...] = fma32(g - m, w - f32(1), g)
    v[...] = fma32(f32(1 - beta2) * g, g, v * f32(beta2))  # mul_(beta2).addcmul_(g, g, 1-beta2)
    t = float(step)
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = np.sqrt(v) / f32(bias_correction2_sqrt) + f32(eps)
    param[...] = param + (f32(-step_size) * m) / denom  # addcdiv_(m, denom, value=-step_size)


def checked(update, args, written, dry_run=False, **kwargs):
    """The kernels' keep_finite (and dry_run): `update(*args, **kwargs)` on copies of the
    arrays at positions `written`; they are copied back only if every new value is finite
    (and not dry_run). Returns whether every new value is finite."""
    args = list(args)
    originals = {i: args[i] for i in written}
    for i in written:
        args[i] = args[i].copy()
    with np.errstate(all="ignore"):
        update(*args, **kwargs)
    finite = all(np.isfinite(args[i]).all() for i in written)
    if finite and not dry_run:
        for i, original in originals.items():
            original[...] = args[i]
    return bool(finite)


def amax(x):
    """The largest |x| (0.0 when empty): NaN if any is NaN, as np.max of |x| gives."""
    return float(np.max(np.abs(x), initial=0.0)) if x.size else 0.0
