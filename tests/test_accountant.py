"""worker/accountant.py against Google's dp_accounting (epsilons, integer-order RDP), against a
30-digit numerical integral (fractional orders), on closed forms and edge cases, and its refusals.

dp_accounting >= 0.4.4 sums |terms| of the fractional-order series (it dropped the signs of the
binomial coefficients past k = alpha), an upper bound; so there we check ours <= theirs instead.
"""

import math

import dp_accounting
import mpmath  # installed with dp-accounting, which depends on it
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as google_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    dp_sgd_epsilon,
    epsilon_from_rdp,
    rdp_subsampled_gaussian,
    sigma_for_epsilon,
)

ORDERS = np.array(DEFAULT_ORDERS, dtype=np.float64)
INT_ORDERS = [a for a in DEFAULT_ORDERS if float(a).is_integer()]
FRAC_ORDERS = [a for a in DEFAULT_ORDERS if not float(a).is_integer()]
Q_GRID = [1e-3, 0.01, 0.1, 0.5]
SIGMA_GRID = [0.5, 1.0, 2.0, 10.0]

# (q, sigma, steps, delta)
SETTINGS = [
    (0.01, 4.0, 10_000, 1e-5),  # Abadi et al. 2016, Section 3.1: MNIST, lot 600 of 60000
    (0.01, 1.1, 6_000, 1e-5),  # Abadi et al. 2016 MNIST, 60 epochs (steps = epochs / q)
    (0.01, 8.0, 6_000, 1e-5),  # their "large noise" setting
    (256 / 60_000, 1.1, 14_063, 1e-5),  # batch 256 of MNIST, 60 epochs
    (0.1, 2.0, 1_000, 1e-5),
    (0.5, 10.0, 100, 1e-3),
    (1e-3, 0.5, 1_000, 1e-6),
    (0.05, 0.7, 500, 1e-5),
    (0.25, 5.0, 2_000, 1e-6),
]


def google_epsilon(q, sigma, steps, delta, orders=DEFAULT_ORDERS):
    accountant = dp_accounting.rdp.RdpAccountant(list(orders))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def integral_rdp(q, sigma, alpha):
    """RDP at alpha as log(A) / (alpha - 1), A = E_{z~N(0,s^2)}[((1-q) + q L(z))^alpha]: the
    definition, integrated numerically in 30 digits, without the series."""
    with mpmath.workdps(30):
        q, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)

        def integrand(z):
            ratio = (1 - q) + q * mpmath.exp((2 * z - 1) / (2 * s * s))
            return mpmath.npdf(z, 0, s) * ratio**a

        z0 = s * s * mpmath.log(1 / q - 1) + mpmath.mpf(1) / 2  # where the two parts balance
        total = mpmath.quad(integrand, [-mpmath.inf, 0, z0, a, mpmath.inf])
        return float(mpmath.log(total) / (a - 1))


# ---- against dp_accounting ---------------------------------------------------------------------


@pytest.mark.parametrize("q, sigma, steps, delta", SETTINGS)
def test_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    ours = dp_sgd_epsilon(q, sigma, steps, delta)
    theirs = google_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.01)
    # Theirs over-states fractional orders, never under-states: ours can only be lower.
    assert ours <= theirs * (1 + 1e-6)


def test_abadi_mnist_is_within_the_moments_accountant_bound():
    # Abadi et al. 2016: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 gives epsilon ~ 1.26 with
    # the moments accountant; exact RDP and the improved conversion can only do better.
    eps = dp_sgd_epsilon(0.01, 4.0, 10_000, 1e-5)
    assert 0.9 < eps <= 1.26


@pytest.mark.parametrize("q", Q_GRID)
@pytest.mark.parametrize("sigma", SIGMA_GRID)
def test_integer_orders_match_dp_accounting(q, sigma):
    ours = rdp_subsampled_gaussian(q, sigma, INT_ORDERS)
    theirs = google_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, INT_ORDERS)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("q", Q_GRID)
@pytest.mark.parametrize("sigma", SIGMA_GRID)
def test_fractional_orders_are_below_dp_accountings_upper_bound(q, sigma):
    orders = [1.1, 1.5, 2.5, 4.7, 7.3, 10.9]
    ours = rdp_subsampled_gaussian(q, sigma, orders)
    theirs = google_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
    assert np.all(ours > 0)
    # Theirs is inf where its 1000 terms ran out; 1e-6 covers rounding where RDP is ~1e-8.
    assert np.all(ours <= theirs * (1 + 1e-6))


@pytest.mark.parametrize("q, sigma, alpha", [
    (0.01, 1.0, 1.5), (0.01, 1.1, 5.6), (1e-3, 10.0, 1.5), (0.1, 2.0, 3.3),
    (1e-3, 0.5, 5.5), (0.5, 10.0, 1.1), (0.5, 0.5, 10.9), (0.01, 2.0, 100.5),
])
def test_fractional_orders_match_the_integral(q, sigma, alpha):
    assert rdp_subsampled_gaussian(q, sigma, [alpha])[0] == pytest.approx(
        integral_rdp(q, sigma, alpha), rel=1e-6)


def test_matches_dp_accounting_before_it_dropped_the_signs():
    # dp-accounting 0.4.3's test_compute_rdp_poisson_sampled_gaussian (signed series), which
    # 0.4.4 changed to 6.70579741e-04 at order 1.5 when it began summing |terms|.
    rdp = 50 * rdp_subsampled_gaussian(0.01, 2.5, [1.5, 2.5, 5, 50, 100])
    np.testing.assert_allclose(rdp, [6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e02],
                               rtol=1e-4)


# ---- closed forms and edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("q", Q_GRID)
@pytest.mark.parametrize("sigma", SIGMA_GRID)
def test_order_two_has_a_closed_form(q, sigma):
    # A_2 = E[((1-q) + qL)^2] = 1 + q^2 (E[L^2] - 1), and E[L^2] = exp(1 / sigma^2).
    want = math.log1p(q * q * math.expm1(1 / sigma**2))
    assert rdp_subsampled_gaussian(q, sigma, [2])[0] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_q_one_is_the_gaussian_mechanism(sigma):
    gaussian = ORDERS / (2 * sigma**2)
    np.testing.assert_array_equal(rdp_subsampled_gaussian(1.0, sigma, DEFAULT_ORDERS), gaussian)
    # ... and the series tends to it as q -> 1.
    np.testing.assert_allclose(rdp_subsampled_gaussian(1 - 1e-9, sigma, DEFAULT_ORDERS),
                               gaussian, rtol=1e-7)


def test_q_zero_spends_nothing():
    assert np.all(rdp_subsampled_gaussian(0.0, 1.0, DEFAULT_ORDERS) == 0)
    eps0 = dp_sgd_epsilon(0.0, 1.0, 1_000, 1e-5)
    assert eps0 == 0.0  # KL = 0 <= delta: (0, delta)-DP
    assert eps0 <= min(dp_sgd_epsilon(q, 1.0, 1_000, 1e-5) for q in [1e-6, 1e-3, 0.1])
    assert eps0 == google_epsilon(0.0, 1.0, 1_000, 1e-5)


def test_no_noise_is_no_privacy_and_infinite_noise_is_full_privacy():
    assert np.all(np.isinf(rdp_subsampled_gaussian(0.01, 0.0, DEFAULT_ORDERS)))
    assert dp_sgd_epsilon(0.01, 0.0, 10, 1e-5) == math.inf
    assert np.all(rdp_subsampled_gaussian(0.01, math.inf, DEFAULT_ORDERS) == 0)


def test_epsilon_grows_with_steps_and_q_and_falls_with_sigma():
    by_steps = [dp_sgd_epsilon(0.01, 1.1, t, 1e-5) for t in [0, 1, 10, 100, 1_000, 10_000]]
    by_q = [dp_sgd_epsilon(q, 1.1, 1_000, 1e-5) for q in [0, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1]]
    by_sigma = [dp_sgd_epsilon(0.01, s, 1_000, 1e-5) for s in [0.5, 0.8, 1.1, 2, 4, 10]]
    assert by_steps[0] == 0.0
    assert np.all(np.diff(by_steps) > 0)
    assert np.all(np.diff(by_q) > 0)
    assert np.all(np.diff(by_sigma) < 0)


@settings(deadline=None, max_examples=25)
@given(q=st.floats(1e-4, 0.99), sigma=st.floats(0.3, 20))
def test_rdp_grows_with_order_and_never_exceeds_the_gaussian(q, sigma):
    # A Renyi divergence is non-decreasing in its order: across the grid this checks that the
    # integer formula and the fractional series agree where they meet (1.9, 2.0, 2.1, ...).
    orders = [1.5, 1.9, 2.0, 2.1, 2.9, 3.0, 3.1, 9.9, 10.0, 10.1, 11.0, 40.0]
    rdp = rdp_subsampled_gaussian(q, sigma, orders)
    assert np.all(rdp > 0)
    assert np.all(np.diff(rdp) >= -1e-9 * rdp[1:])
    # Subsampling never hurts: the plain Gaussian mechanism bounds it.
    assert np.all(rdp <= np.array(orders) / (2 * sigma**2) * (1 + 1e-12))


# ---- composition and conversion ----------------------------------------------------------------


def test_composition_adds_rdp_and_counts_steps():
    once, thrice, mixed = RdpAccountant(), RdpAccountant(), RdpAccountant()
    once.step(0.01, 1.1, count=3)
    for _ in range(3):
        thrice.step(0.01, 1.1)
    mixed.step(0.01, 1.1, count=2)
    mixed.step(0.02, 0.9)
    mixed.step(0.5, 0.0, count=0)  # no steps: nothing spent, no 0 * inf
    assert once.steps == thrice.steps == mixed.steps == 3
    assert once.epsilon(1e-5) == pytest.approx(thrice.epsilon(1e-5), rel=1e-12)
    want = 2 * rdp_subsampled_gaussian(0.01, 1.1, ORDERS) + rdp_subsampled_gaussian(
        0.02, 0.9, ORDERS)
    assert mixed.epsilon(1e-5) == epsilon_from_rdp(ORDERS, want, 1e-5)[0]
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_conversion_is_the_improved_bound():
    # One order, by hand: eps = r + log((a-1)/a) - (log(delta) + log(a)) / (a-1).
    a, r, delta = 8.0, 0.5, 1e-5
    want = r + math.log(7 / 8) - (math.log(delta) + math.log(a)) / 7
    assert epsilon_from_rdp([a], [r], delta) == (pytest.approx(want, rel=1e-14), 8.0)
    # The best order wins, orders <= 1 give no bound, and nothing finite gives (inf, nan).
    assert epsilon_from_rdp([0.5, 1.0, 8.0, 16.0], [0.1, 0.2, 0.5, 100.0], delta)[1] == 8.0
    eps, order = epsilon_from_rdp([2.0, 3.0], [math.inf, math.inf], delta)
    assert eps == math.inf and math.isnan(order)
    # A huge order with almost no RDP (but more than the KL shortcut's delta^2) makes the formula
    # negative: (eps < 0, delta)-DP implies (0, delta)-DP.
    assert epsilon_from_rdp([1e9], [1e-9], delta)[0] == 0.0


# ---- calibration -------------------------------------------------------------------------------


@pytest.mark.parametrize("target, q, steps, delta", [
    (1.0, 0.01, 6_000, 1e-5),
    (8.0, 0.004, 10_000, 1e-5),
    (0.5, 0.001, 1_000, 1e-6),
])
def test_sigma_for_epsilon_is_the_smallest_that_meets_the_target(target, q, steps, delta):
    tol = 0.01
    sigma = sigma_for_epsilon(target, q, steps, delta, tol=tol)
    assert dp_sgd_epsilon(q, sigma, steps, delta) <= target
    assert dp_sgd_epsilon(q, sigma * (1 - tol), steps, delta) > target


def test_sigma_for_epsilon_bounds():
    with pytest.raises(ValueError, match=r"target_epsilon=0\.01 .*q=0\.5, steps=10000"):
        sigma_for_epsilon(0.01, 0.5, 10_000, 1e-5)
    assert sigma_for_epsilon(1.0, 0.01, 0, 1e-5) == 0.1  # nothing to hide: the range's bottom


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: rdp_subsampled_gaussian(-0.1, 1.0, [2]), r"q \(sampling rate\).*-0\.1"),
    (lambda: rdp_subsampled_gaussian(1.5, 1.0, [2]), r"q \(sampling rate\).*1\.5"),
    (lambda: rdp_subsampled_gaussian(math.nan, 1.0, [2]), r"q \(sampling rate\).*nan"),
    (lambda: rdp_subsampled_gaussian(0.1, -1.0, [2]), r"sigma \(noise multiplier\).*-1\.0"),
    (lambda: rdp_subsampled_gaussian(0.1, 1.0, [2, 1.0, 0.5]), r"orders.*> 1.*\[1\.0, 0\.5\]"),
    (lambda: rdp_subsampled_gaussian(0.1, 1.0, []), r"orders must be a non-empty"),
    (lambda: epsilon_from_rdp([2], [0.1], 0.0), r"delta.*0\.0"),
    (lambda: epsilon_from_rdp([2], [0.1], 1.0), r"delta.*1\.0"),
    (lambda: epsilon_from_rdp([2, 3], [0.1], 1e-5), r"2 orders and 1 rdp"),
    (lambda: epsilon_from_rdp([2], [math.nan], 1e-5), r"rdp must not contain NaN"),
    (lambda: dp_sgd_epsilon(0.01, 1.0, -1, 1e-5), r"steps.*-1"),
    (lambda: dp_sgd_epsilon(0.01, 1.0, 10.5, 1e-5), r"steps.*10\.5"),
    (lambda: dp_sgd_epsilon(0.01, 1.0, 10, -1e-5), r"delta.*-1e-05"),
    (lambda: RdpAccountant().step(0.01, 1.0, count=-2), r"count.*-2"),
    (lambda: RdpAccountant([0.9]), r"orders.*> 1.*\[0\.9\]"),
    (lambda: sigma_for_epsilon(0.0, 0.01, 10, 1e-5), r"target_epsilon.*0\.0"),
    (lambda: sigma_for_epsilon(1.0, 0.01, 10, 1e-5, tol=0), r"tol.*0"),
    (lambda: sigma_for_epsilon(1.0, 2.0, 10, 1e-5), r"q \(sampling rate\).*2\.0"),
])
def test_bad_inputs_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
