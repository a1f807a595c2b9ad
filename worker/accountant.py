"""Privacy accounting for DP-SGD: how much (epsilon, delta) a run of noisy, subsampled steps spends.

A Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
arXiv:1908.10530), with the improved RDP -> (epsilon, delta) conversion of Balle et al. 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "dp_sgd_epsilon",
    "epsilon_from_rdp",
    "rdp_subsampled_gaussian",
    "sigma_for_epsilon",
]

# Renyi orders alpha to track. Fine steps near 1 matter for large epsilon, large orders for small
# epsilon; the integer-valued ones (2.0, 3.0, ...) take the exact binomial formula.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256]
)

_SIGMA_LO, _SIGMA_HI = 0.1, 1000.0  # the range sigma_for_epsilon searches, as Opacus does
_NEGLIGIBLE = -37.0  # log of a term too small to change A_alpha >= 1 in float64 (e^-37 ~ 1e-16)
_ERFC = np.frompyfunc(math.erfc, 1, 1)
_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)  # log|Gamma(x)|, also for negative non-integer x


# ---- checks: every error names the argument and the value -------------------------------------


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 1.0:  # also refuses NaN
        raise ValueError(f"q (sampling rate) must be in [0, 1], got {q!r}")


def _check_sigma(sigma: float) -> None:
    if not sigma >= 0.0:
        raise ValueError(f"sigma (noise multiplier) must be >= 0, got {sigma!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0:
        raise ValueError(f"orders must be a non-empty list of numbers, got {orders!r}")
    bad = alphas[~(alphas > 1.0)]
    if bad.size:
        raise ValueError(f"orders must all be > 1, got {bad.tolist()}")
    return alphas


# ---- special functions, in log space ----------------------------------------------------------


def _log_erfcx(x: np.ndarray) -> np.ndarray:
    """log(exp(x^2) * erfc(x)), elementwise, without overflow or cancellation for large x."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    small = x < 20.0
    xs = x[small]
    out[small] = xs * xs + np.log(_ERFC(xs).astype(np.float64))
    # Asymptotic series erfcx(x) = 1/(x sqrt(pi)) * sum_n (-1)^n (2n-1)!! / (2x^2)^n
    # (Abramowitz & Stegun 7.1.23); at x >= 20, nine terms leave a relative error below 1e-18.
    xb = x[~small]
    inv = 1.0 / (2.0 * xb * xb)
    term = np.ones_like(xb)
    series = np.ones_like(xb)
    for n in range(1, 9):
        term = term * (-(2 * n - 1) * inv)
        series = series + term
    out[~small] = np.log(series) - np.log(xb) - 0.5 * math.log(math.pi)
    return out


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """log(exp(x) - 1) for x > 0, elementwise, without overflow."""
    x = np.asarray(x, dtype=np.float64)
    # Above 30, exp(-x) is below float64 resolution next to 1, so log(exp(x) - 1) = x + log1p(..).
    return np.where(x > 30.0, x + np.log1p(-np.exp(-np.maximum(x, 30.0))),
                    np.log(np.expm1(np.minimum(x, 30.0))))


def _log_binom(alpha: float, k: np.ndarray) -> np.ndarray:
    """log|C(alpha, k)| for real alpha and integer k >= 0 (generalised binomial coefficient)."""
    return (math.lgamma(alpha + 1.0) - _LGAMMA(k + 1.0).astype(np.float64)
            - _LGAMMA(alpha - k + 1.0).astype(np.float64))


def _log_binom_run(alpha: float, start: int, size: int) -> np.ndarray:
    """log|C(alpha, k)| for k = start .. start + size - 1, alpha not an integer.

    One lgamma, then the ratio C(alpha, k + 1) / C(alpha, k) = (alpha - k) / (k + 1) summed in
    log space: a long tail costs one log per term instead of two lgamma calls.
    """
    first = _log_binom(alpha, np.array([float(start)]))
    j = np.arange(start, start + size - 1, dtype=np.float64)
    return np.concatenate([first, first + np.cumsum(np.log(np.abs(alpha - j) / (j + 1.0)))])


# ---- one step: log A_alpha, where RDP(alpha) = log(A_alpha) / (alpha - 1) ----------------------
#
# A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q L(z))^alpha], L(z) = exp((2z - 1) / (2 s^2)) the
# likelihood ratio of N(1, s^2) to N(0, s^2): the Renyi moment of the mixture against the base.


def _log_a_minus_1_int(q: float, sigma: float, alpha: int) -> float:
    """log(A_alpha - 1) for integer alpha >= 2, 0 < q < 1, by the binomial expansion.

    A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)), a finite
    sum for integer alpha (MTZ 2019, Section 3). The binomial weights sum to 1 and the k = 0, 1
    terms have exponent 0, so A_alpha - 1 = sum_{k >= 2} weight_k * expm1(...): all terms
    positive, and no cancellation when A_alpha is 1 + 1e-12, as at small q or large sigma.
    """
    k = np.arange(2, alpha + 1, dtype=np.float64)
    log_terms = (_log_binom(alpha, k) + (alpha - k) * math.log1p(-q) + k * math.log(q)
                 + _log_expm1((k * k - k) / (2.0 * sigma * sigma)))
    top = float(log_terms.max())
    return top + math.log(float(np.exp(log_terms - top).sum()))


def _log_gauss_tail(log_direct: np.ndarray, x: np.ndarray, log_shifted: np.ndarray) -> np.ndarray:
    """log(exp(log_direct) * erfc(x) / 2), given also log_shifted = log_direct - x^2 in closed form.

    For x < 0, erfc(x) is in (1, 2]: use log_direct. For x >= 0, erfc underflows near x = 27 while
    exp(log_direct) overflows, so use log_shifted + log erfcx(x), whose parts stay moderate.
    """
    out = np.empty_like(x)
    neg = x < 0.0
    out[neg] = log_direct[neg] + np.log(_ERFC(x[neg]).astype(np.float64))
    out[~neg] = log_shifted[~neg] + _log_erfcx(x[~neg])
    return out - math.log(2.0)


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha > 1, 0 < q < 1, by the two series of MTZ 2019 Section 3.3.

    Split the integral at z0, where q L(z0) = 1 - q, and on each side expand ((1 - q) + q L)^alpha
    binomially in the smaller part; a Gaussian integral over a half-line gives each term:
        A = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 s^2)) erfc(x1) / 2
          + sum_k C(alpha, k) (1 - q)^k q^m exp((m^2 - m) / (2 s^2)) erfc(x2) / 2,
    m = alpha - k, x1 = (k - z0) / (sqrt2 s), x2 = (z0 - m) / (sqrt2 s). Past k = alpha the
    coefficients alternate in sign and both terms shrink in magnitude (each is |C(alpha, k)| times
    a moment of a ratio <= 1), so the tail is at most the first term left out.
    """
    lq, l1q = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (l1q - lq) + 0.5
    scale = math.sqrt(2.0) * sigma
    two_var = 2.0 * sigma * sigma
    # exp(...) * erfc(x) = exp(... - x^2) erfcx(x), and for both series the exponent minus x^2
    # is this one constant: the k-dependence cancels exactly (z0 is where the two parts balance).
    log_shifted = alpha * l1q - z0 * z0 / two_var
    first_negative = math.ceil(alpha) + 1  # C(alpha, k) < 0 first at k = ceil(alpha) + 1

    # The sum is held as acc * exp(acc_log), a signed float at a running scale.
    acc, acc_log = 0.0, -math.inf
    start, size = 0, max(512, 2 * first_negative)
    while True:
        k = np.arange(start, start + size, dtype=np.float64)
        m = alpha - k
        # The first chunk, which holds the large terms, takes lgamma for every k.
        log_c = _log_binom(alpha, k) if start == 0 else _log_binom_run(alpha, start, size)
        sign = np.where(k < first_negative, 1.0, 1.0 - 2.0 * ((k - first_negative) % 2 == 0))
        shifted = np.full_like(k, log_shifted)
        log_t1 = log_c + _log_gauss_tail(m * l1q + k * lq + (k * k - k) / two_var,
                                         (k - z0) / scale, shifted)
        log_t2 = log_c + _log_gauss_tail(k * l1q + m * lq + (m * m - m) / two_var,
                                         (z0 - m) / scale, shifted)
        top = float(max(log_t1.max(), log_t2.max()))
        part = float((sign * (np.exp(log_t1 - top) + np.exp(log_t2 - top))).sum())
        new_log = max(acc_log, top)
        acc = acc * math.exp(acc_log - new_log) + part * math.exp(top - new_log)
        acc_log = new_log
        start += size
        # Stop once a term is negligible next to A >= 1 (a Renyi divergence is >= 0).
        if start > alpha and max(log_t1[-1], log_t2[-1]) < _NEGLIGIBLE:
            break
        size = min(2 * size, 1 << 16)  # long tails (alpha near 1) arrive in larger chunks
    if not acc > 0.0:
        raise ArithmeticError(f"series for q={q!r}, sigma={sigma!r}, alpha={alpha!r} "
                              f"lost all precision (sum {acc!r})")
    return acc_log + math.log(acc)


def rdp_subsampled_gaussian(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP epsilon of ONE step of the Poisson-subsampled Gaussian mechanism, at each order.

    q is the probability that each example is in the batch; sigma = noise std / clip norm.
    Integer orders use the exact binomial sum, fractional ones the MTZ 2019 series; both in log
    space, so orders up to 256 and beyond stay finite and accurate.
    """
    _check_q(q)
    _check_sigma(sigma)
    alphas = _check_orders(orders)
    if q == 0.0 or math.isinf(sigma):
        return np.zeros_like(alphas)  # nobody's data is used, or all of it is drowned
    if sigma == 0.0:
        return np.full_like(alphas, math.inf)  # the exact gradient is released
    if q == 1.0:
        return alphas / (2.0 * sigma * sigma)  # the plain Gaussian mechanism (Mironov 2017)
    rdp = np.empty_like(alphas)
    for i, alpha in enumerate(alphas):
        if math.isinf(alpha):
            rdp[i] = math.inf  # the Gaussian likelihood ratio is unbounded
        elif alpha.is_integer():
            # log A = log1p(A - 1), computed from log(A - 1) without forming A.
            rdp[i] = np.logaddexp(0.0, _log_a_minus_1_int(q, sigma, int(alpha))) / (alpha - 1)
        else:
            rdp[i] = _log_a_frac(q, sigma, float(alpha)) / (alpha - 1)
    # A rounding error can leave -1e-17 where the divergence is 0: a divergence is never negative.
    return np.maximum(rdp, 0.0)


# ---- RDP -> (epsilon, delta) ------------------------------------------------------------------


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float],
                     delta: float) -> tuple[float, float]:
    """The smallest epsilon that RDP curve `rdp` (one value per order) gives at `delta`.

    Returns (epsilon, the order that gives it); the order is NaN when no order gives a finite
    epsilon. Uses eps = rdp + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1) (Balle et al.
    2020, arXiv:1905.09982; Canonne, Kamath, Steinke 2020, arXiv:2004.00010, Proposition 12),
    tighter than Mironov's rdp - log(delta) / (a - 1). Orders <= 1 give no bound this way.
    """
    _check_delta(delta)
    alphas = np.asarray(orders, dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape or alphas.ndim != 1:
        raise ValueError(f"orders and rdp must be 1-D and of one length, got {len(alphas)} "
                         f"orders and {len(values)} rdp values")
    if np.isnan(values).any():
        raise ValueError(f"rdp must not contain NaN, got {values.tolist()}")
    values = np.maximum(values, 0.0)  # a Renyi divergence is >= 0; clamp rounding noise
    eps = np.full_like(values, math.inf)
    usable = (alphas > 1.0) & np.isfinite(values) & np.isfinite(alphas)
    a, r = alphas[usable], values[usable]
    eps[usable] = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    # KL <= D_alpha for alpha >= 1, and total variation <= sqrt(1 - exp(-KL)) (Bretagnolle-
    # Huber): when that is <= delta we have (0, delta)-DP. This is what makes q = 0 give 0.
    eps[(alphas >= 1.0) & (delta * delta + np.expm1(-values) >= 0.0)] = 0.0
    best = int(np.argmin(eps))
    if math.isinf(eps[best]):
        return math.inf, math.nan
    # (eps, delta)-DP with eps < 0 implies (0, delta)-DP, so clamp the formula's negative values.
    return max(0.0, float(eps[best])), float(alphas[best])


# ---- composition ------------------------------------------------------------------------------


class RdpAccountant:
    """Tracks the RDP curve of a run; RDP composes by adding, order by order."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self._orders = _check_orders(orders)
        self._rdp = np.zeros_like(self._orders)  # total RDP so far, one value per order
        self._steps = 0
        # A training loop steps with one (q, sigma) again and again, and one step's RDP costs
        # milliseconds (the fractional series): keep the last one.
        self._last: tuple[float, float, np.ndarray] | None = None

    def step(self, q: float, sigma: float, count: int = 1) -> None:
        """Record `count` steps, each sampling with rate q and adding noise sigma * clip norm."""
        _check_count("count", count)
        if self._last is not None and self._last[:2] == (q, sigma):
            per_step = self._last[2]
        else:
            per_step = rdp_subsampled_gaussian(q, sigma, self._orders)
            self._last = (q, sigma, per_step)
        if count:  # skip 0 * inf = NaN when sigma = 0 and count = 0
            self._rdp = self._rdp + count * per_step
            self._steps += int(count)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far, at this delta."""
        return epsilon_from_rdp(self._orders, self._rdp, delta)[0]

    @property
    def steps(self) -> int:
        """How many steps have been recorded."""
        return self._steps


def dp_sgd_epsilon(q: float, sigma: float, steps: int, delta: float, *,
                   orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon at `delta` of `steps` DP-SGD steps, sampling rate q, noise multiplier sigma."""
    _check_count("steps", steps)
    _check_delta(delta)
    accountant = RdpAccountant(orders)
    accountant.step(q, sigma, steps)
    return accountant.epsilon(delta)


def sigma_for_epsilon(target_epsilon: float, q: float, steps: int, delta: float,
                      tol: float = 0.01, *, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The smallest noise multiplier, to relative `tol`, that keeps epsilon <= target_epsilon.

    Bisects sigma over [0.1, 1000] as Opacus's get_noise_multiplier does. The answer meets the
    target, and sigma * (1 - tol) does not (unless even sigma = 0.1 meets it: then 0.1).
    """
    if not target_epsilon > 0.0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    _check_q(q)
    _check_count("steps", steps)
    _check_delta(delta)

    def epsilon(sigma: float) -> float:
        return dp_sgd_epsilon(q, sigma, steps, delta, orders=orders)

    lo, hi = _SIGMA_LO, _SIGMA_HI
    if (floor := epsilon(hi)) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is out of reach: even sigma={hi} gives epsilon "
            f"{floor:.4g} (q={q!r}, steps={steps!r}, delta={delta!r})")
    if epsilon(lo) <= target_epsilon:
        return lo
    # Invariant: epsilon(lo) > target >= epsilon(hi); epsilon falls as sigma grows. Bisect in
    # log sigma (the range spans four decades) until lo is within tol of hi.
    while lo < hi * (1.0 - tol):
        mid = math.sqrt(lo * hi)
        if epsilon(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
