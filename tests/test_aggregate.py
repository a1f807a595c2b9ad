"""kernels/aggregate.py against its twin (bit for bit) and np.median, with the NaN, inf and
-0.0 rules that robust aggregation depends on, and its refusals."""

import itertools

import numpy as np
import pytest
from bits import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from jit import outputs_with_and_without_jit
from twins import aggregate as twin

from kernels.aggregate import (
    _block_columns,
    _merge_exchange_pairs,
    aggregate_mean,
    aggregate_median,
    aggregate_trimmed_mean,
)

WS = [1, 2, 3, 4, 5, 8, 13]


def _ns(W):
    # sizes 0 and 1, odd, and across a block boundary
    block = _block_columns(W)
    return [0, 1, 7, block - 1, block + 1, 2 * block + 3]


def _awkward(rng, W, n):
    """Normal values salted with NaN, +-inf, +-0.0, subnormals and duplicates."""
    g = rng.standard_normal((W, n)).astype(np.float32)
    salt = rng.random((W, n))
    g[salt < 0.06] = np.nan
    g[(salt >= 0.06) & (salt < 0.09)] = np.inf
    g[(salt >= 0.09) & (salt < 0.11)] = -np.inf
    g[(salt >= 0.11) & (salt < 0.18)] = -0.0
    g[(salt >= 0.18) & (salt < 0.25)] = 0.0
    g[(salt >= 0.25) & (salt < 0.28)] = np.float32(1e-45)
    g[(salt >= 0.28) & (salt < 0.33)] = 1.0
    return g


def test_merge_exchange_network_sorts_every_01_input():
    # 0-1 principle: a comparator network that sorts every 0/1 input sorts every input.
    for W in range(1, 13):
        pairs = _merge_exchange_pairs(W)
        x = np.array(list(itertools.product([0, 1], repeat=W)), np.int8).T  # (W, 2**W)
        for i, j in pairs:
            x[i], x[j] = np.minimum(x[i], x[j]), np.maximum(x[i], x[j])
        assert (np.diff(x, axis=0) >= 0).all(), W
    assert len(_merge_exchange_pairs(8)) == 19  # Batcher's network for 8 inputs


@pytest.mark.parametrize("W", WS)
def test_kernels_match_twins_bit_for_bit(W):
    rng = np.random.default_rng(W)
    for n in _ns(W):
        g = _awkward(rng, W, n)
        before = g.copy()
        with np.errstate(invalid="ignore"):  # inf - inf in the twins' float64 sums
            assert_same_bits(aggregate_mean(g), twin.aggregate_mean(g))
            assert_same_bits(aggregate_median(g), twin.aggregate_median(g))
            for tf in (0.0, 0.1, 0.2, 0.25, 0.34, 0.49):
                assert_same_bits(aggregate_trimmed_mean(g, tf), twin.aggregate_trimmed_mean(g, tf))
        assert_same_bits(g, before)  # inputs are read only


@pytest.mark.parametrize("W", range(1, 10))
def test_median_is_np_median_on_finite_values(W):
    rng = np.random.default_rng(10 + W)
    g = rng.standard_normal((W, 3001)).astype(np.float32)
    g[:, ::7] = np.round(g[:, ::7])  # ties
    # equal as values: np.median may turn -0.0 into +0.0 (its mean adds a +0.0)
    np.testing.assert_array_equal(aggregate_median(g), np.median(g, axis=0))


def test_median_nan_counts_as_largest():
    nan = np.nan
    g = np.array(
        [
            [1.0, nan, nan],
            [2.0, 5.0, nan],
            [3.0, 6.0, 7.0],
            [nan, nan, nan],
            [4.0, 8.0, nan],
        ],
        np.float32,
    )  # (W=5, n=3): one, two and four NaNs per column
    got = aggregate_median(g)
    assert got[0] == 3.0  # [1 2 3 4 NaN]
    assert got[1] == 8.0  # [5 6 8 NaN NaN]: NaN from two of five workers is outvoted
    assert np.isnan(got[2])  # four of five
    assert got[2:].view(np.uint32)[0] == 0x7FC00000  # one canonical quiet NaN
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.median(g, axis=0)[1])  # np.median would give up


def test_median_sign_of_zero_is_defined():
    z, nz = 0.0, -0.0
    g = np.array([[nz, nz, nz, z], [z, nz, z, z], [z, nz, nz, z]], np.float32)
    got = aggregate_median(g).view(np.uint32)
    # sorted with -0.0 before +0.0: middle of (-0,+0,+0), (-0,-0,-0), (-0,-0,+0), (+0,+0,+0)
    np.testing.assert_array_equal(got, np.array([0, 0x80000000, 0x80000000, 0], np.uint32))


def test_even_median_does_not_overflow():
    big = np.float32(3e38)
    g = np.array([[big, -big], [big, -big]], np.float32)
    assert_same_bits(aggregate_median(g), np.array([big, -big], np.float32))
    with np.errstate(over="ignore"):
        assert np.isinf(np.median(g, axis=0)).all()  # float32 a + b overflows in np.median


def test_mean_does_not_overflow_and_propagates_nan():
    top = np.finfo(np.float32).max
    g = np.array([[top, np.nan, np.inf, 1.0], [top, 1.0, -np.inf, 2.0]], np.float32)
    with np.errstate(invalid="ignore"):
        got = aggregate_mean(g)
    assert got[0] == top
    assert np.isnan(got[1]) and np.isnan(got[2])
    assert got[3] == 1.5


def test_trimmed_mean_trims_byzantine_values():
    rng = np.random.default_rng(20)
    honest = rng.uniform(-1, 1, (7, 500)).astype(np.float32)
    g = honest.copy()
    g[0] = 1e30
    g[1] = np.nan
    g[2] = -np.inf
    tm = aggregate_trimmed_mean(g, 3 / 7)  # floor(3/7 * 7) = 3 dropped at each end
    med = aggregate_median(g)
    lo, hi = honest[3:].min(axis=0), honest[3:].max(axis=0)
    assert np.all((lo <= tm) & (tm <= hi))
    assert np.all((lo <= med) & (med <= hi))
    # trimming one at each end drops -inf and NaN (the largest), but 1e30 stays in the mean
    assert np.all(aggregate_trimmed_mean(g, 0.2) > 1e29)


def test_trimmed_mean_zero_is_the_mean_on_exact_data():
    # small integers: every float64 sum is exact, so the summation order cannot matter
    g = np.random.default_rng(21).integers(-50, 50, (6, 301)).astype(np.float32)
    assert_same_bits(aggregate_trimmed_mean(g, 0.0), aggregate_mean(g))


def test_non_contiguous_input():
    g = np.random.default_rng(22).standard_normal((5, 40)).astype(np.float32)
    view = g[::-1, ::3]
    for f, t in (
        (aggregate_mean, twin.aggregate_mean),
        (aggregate_median, twin.aggregate_median),
    ):
        assert_same_bits(f(view), t(np.ascontiguousarray(view)))


@settings(deadline=None, max_examples=80)
@given(
    st.integers(1, 10).flatmap(lambda W: arrays(np.float32, (W, 33), elements=st.floats(width=32))),
    st.sampled_from([0.0, 0.1, 0.25, 0.4]),
)
def test_any_floats_match_twins(g, tf):
    with np.errstate(invalid="ignore"):
        assert_same_bits(aggregate_mean(g), twin.aggregate_mean(g))
        assert_same_bits(aggregate_median(g), twin.aggregate_median(g))
        assert_same_bits(aggregate_trimmed_mean(g, tf), twin.aggregate_trimmed_mean(g, tf))


@settings(deadline=None, max_examples=50)
@given(
    st.integers(1, 9).flatmap(lambda W: arrays(np.float32, (W, 17), elements=st.floats(width=32))),
    st.randoms(use_true_random=False),
)
def test_order_statistics_ignore_worker_order(g, random):
    perm = list(range(g.shape[0]))
    random.shuffle(perm)
    with np.errstate(invalid="ignore"):
        assert_same_bits(aggregate_median(g[perm]), aggregate_median(g))
        assert_same_bits(aggregate_trimmed_mean(g[perm], 0.25), aggregate_trimmed_mean(g, 0.25))


BAD = [
    (lambda: aggregate_mean(np.zeros((2, 3))), TypeError, "g must be float32"),
    (lambda: aggregate_median([[1.0, 2.0]]), TypeError, "g must be a numpy.ndarray"),
    (lambda: aggregate_median(np.zeros(3, np.float32)), ValueError, r"shape \(W, n\)"),
    (lambda: aggregate_mean(np.zeros((0, 3), np.float32)), ValueError, "no gradients"),
    (lambda: aggregate_trimmed_mean(np.zeros((4, 3), np.float32), 0.5), ValueError, "0.5"),
    (lambda: aggregate_trimmed_mean(np.zeros((4, 3), np.float32), -0.1), ValueError, "trim"),
    (lambda: aggregate_trimmed_mean(np.zeros((4, 3), np.float32), np.nan), ValueError, "trim"),
    (lambda: aggregate_trimmed_mean(np.zeros((4, 3), np.float32), True), TypeError, "trim"),
]


@pytest.mark.parametrize("call, exc, message", BAD)
def test_refusals(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_python_bodies_match_under_disable_jit():
    code = (
        "import numpy as np\n"
        "from kernels.aggregate import aggregate_mean, aggregate_median, aggregate_trimmed_mean\n"
        "g = np.random.default_rng(7).standard_normal((6, 40)).astype(np.float32)\n"
        "g[0, :5] = np.nan; g[1, 3:8] = -0.0\n"
        "r = [aggregate_mean(g), aggregate_median(g), aggregate_median(g[:5]),\n"
        "     aggregate_trimmed_mean(g, 0.2)]\n"
        "print(np.concatenate(r).view(np.uint32).tolist())\n"
    )
    outs = outputs_with_and_without_jit(code)
    assert outs[0] == outs[1]
