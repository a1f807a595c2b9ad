"""kernels/norms.py against its twin, against torch's clip_grad_norm_ (stored results), on
inf, NaN, -0.0 and subnormals, and its refusals (which must change nothing)."""

import math

import numpy as np
import pytest
from bits import assert_same_bits, hex32
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from jit import outputs_with_and_without_jit
from twins import norms as twin

from kernels.norms import _CHUNK, all_finite, clip_by_global_norm, global_norm

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (_CHUNK + 3,)]


def _data(rng, shape, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# all_finite


@pytest.mark.parametrize("shape", SHAPES)
def test_all_finite_every_position(shape):
    rng = np.random.default_rng(0)
    x = _data(rng, shape)
    assert all_finite(x) is True
    positions = range(x.size) if x.size < 50 else [0, 1, _CHUNK - 1, _CHUNK, x.size - 1]
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        for i in positions:
            y = x.copy()
            y.reshape(-1)[i] = bad
            assert all_finite(y) is False
            assert all_finite(y) == twin.all_finite(y)


def test_all_finite_edge_values_are_finite():
    f = np.finfo(np.float32)
    x = np.array([-0.0, 0.0, f.max, -f.max, f.tiny, f.smallest_subnormal, -1e-45], np.float32)
    assert all_finite(x) is True
    nan_payload = np.array([0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], np.uint32).view(np.float32)
    for v in nan_payload:  # signalling and negative NaNs too
        assert all_finite(np.array([1.0, v], np.float32)) is False


def test_all_finite_any_layout():
    x = np.zeros((6, 8), np.float32)
    x[5, 7] = np.inf
    assert all_finite(x.T) is False  # Fortran order: a view
    assert all_finite(x[::2, ::3]) is True  # strided: (5, 7) is not in it
    assert all_finite(x[1::2, 1::3]) is False


@settings(deadline=None, max_examples=100)
@given(arrays(np.float32, st.integers(0, 200), elements=st.floats(width=32)))
def test_all_finite_matches_twin(x):
    assert all_finite(x) == twin.all_finite(x)


# ---------------------------------------------------------------------------------------------
# global_norm


def test_global_norm_matches_twin():
    rng = np.random.default_rng(1)
    for shapes in ([], [()], [(0,)], [(1,), (7,)], [(3, 5), (2, 3, 4), (1001,)], [(100003,)]):
        xs = [_data(rng, s, scale=10.0) for s in shapes]
        assert math.isclose(global_norm(xs), twin.global_norm(xs), rel_tol=1e-12, abs_tol=0)
        assert global_norm(tuple(xs)) == global_norm(xs)
    assert global_norm([]) == 0.0


def test_global_norm_is_float64_accurate():
    # 10**6 ones and a 1e-3: float32 accumulation would lose the small part entirely
    x = np.ones(10**6, np.float32)
    want = math.sqrt(10**6 + float(np.float32(1e-3)) ** 2)
    assert math.isclose(global_norm([x, np.array([1e-3], np.float32)]), want, rel_tol=1e-15)
    # squares of 1e30 overflow float32 but not float64
    assert math.isclose(global_norm([np.full(4, 1e30, np.float32)]), 2e30, rel_tol=1e-6)
    assert global_norm([np.array([3.0, -4.0], np.float32)]) == 5.0


def test_global_norm_non_finite():
    assert global_norm([np.ones(3, np.float32), np.array([-np.inf], np.float32)]) == math.inf
    assert math.isnan(global_norm([np.array([np.inf, np.nan], np.float32)]))


@settings(deadline=None, max_examples=60)
@given(
    st.lists(
        arrays(np.float32, st.integers(0, 64), elements=st.floats(-(2.0**60), 2.0**60, width=32)),
        max_size=4,
    )
)
def test_global_norm_property(xs):
    assert math.isclose(global_norm(xs), twin.global_norm(xs), rel_tol=1e-12, abs_tol=1e-300)


# ---------------------------------------------------------------------------------------------
# clip_by_global_norm


def test_clip_matches_torch():
    # torch.nn.utils.clip_grad_norm_([a, b], 1.0), torch 2.13.0 CPU, recorded once. torch sums
    # in float32; here float64: the norms agree to float32 precision, the clipped grads bit for
    # bit (the float32 coefficient came out the same).
    a, b = P0.copy(), G0.copy()
    total = clip_by_global_norm([a, b], 1.0)
    assert math.isclose(total, CLIP_TOTAL_TORCH, rel_tol=2**-23)
    assert_same_bits(a, CLIP_A)
    assert_same_bits(b, CLIP_B)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 3.0, 1e6, math.inf])
def test_clip_matches_twin(max_norm):
    rng = np.random.default_rng(2)
    xs = [_data(rng, s) for s in [(), (0,), (1,), (3, 5), (2, 3, 4), (1001,)]]
    ys = [x.copy() for x in xs]
    total = clip_by_global_norm(xs, max_norm)
    want = twin.clip_by_global_norm(ys, max_norm)
    assert math.isclose(total, want, rel_tol=1e-12)
    for x, y in zip(xs, ys, strict=True):
        # the float32 coefficient could differ by one rounding if the float64 norms did
        np.testing.assert_allclose(x, y, rtol=2**-23, atol=0)
    new_norm = global_norm(xs)
    assert new_norm <= max_norm * (1 + 1e-6) or new_norm == total


def test_clip_below_max_changes_nothing():
    x = np.array([0.1, -0.0, 1e-45, -0.2], np.float32)
    before = x.copy()
    total = clip_by_global_norm([x], 1.0)
    assert total == twin.global_norm([before])
    assert_same_bits(x, before)


def test_clip_non_finite_norm_as_torch():
    # NaN norm: coef NaN, torch multiplies by it (clamp keeps NaN): everything NaN
    x, y = np.array([1.0, np.nan], np.float32), np.array([2.0, -0.0], np.float32)
    assert math.isnan(clip_by_global_norm([x, y], 1.0))
    assert np.isnan(x).all() and np.isnan(y).all()
    # inf norm: coef 0: finite values become signed zeros, infs NaN
    z = np.array([3.0, -2.0, np.inf], np.float32)
    assert clip_by_global_norm([z], 1.0) == math.inf
    assert_same_bits(z, np.array([0.0, -0.0, np.nan], np.float32))


@settings(deadline=None, max_examples=60)
@given(
    st.lists(
        arrays(np.float32, st.integers(0, 40), elements=st.floats(-(2.0**20), 2.0**20, width=32)),
        min_size=1,
        max_size=4,
    ),
    st.floats(1e-3, 1e3),
)
def test_clip_property(xs, max_norm):
    before = global_norm(xs)
    assert clip_by_global_norm(xs, max_norm) == before
    after = global_norm(xs)
    assert after <= max_norm * (1 + 1e-5) + 1e-30
    # torch clips when max_norm / (total + 1e-6) < 1, so a norm just below max_norm is still
    # scaled a little; comfortably below it, nothing changes.
    if before + 1e-5 * max(1.0, max_norm) <= max_norm:
        assert after == before


def _three():
    rng = np.random.default_rng(3)
    return [_data(rng, (4,)), _data(rng, (2, 3)), _data(rng, (5,))]


def _readonly(xs):
    xs[1].flags.writeable = False
    return xs


BAD = [
    (lambda xs: (xs[0], 1.0), TypeError, "arrays must be a list or tuple"),
    (lambda xs: (xs + [np.zeros(3)], 1.0), TypeError, r"arrays\[3\] must be float32"),
    (lambda xs: (xs + [[1.0]], 1.0), TypeError, r"arrays\[3\] must be a numpy.ndarray"),
    (lambda xs: (xs, -1.0), ValueError, "max_norm must be >= 0"),
    (lambda xs: (xs, math.nan), ValueError, "max_norm must be >= 0"),
    (lambda xs: (xs, "1"), TypeError, "max_norm must be a real number"),
    (lambda xs: (xs + [np.zeros((4, 4), np.float32)[:, ::2]], 0.1), ValueError, "contiguous"),
    (lambda xs: (_readonly(xs), 0.1), ValueError, r"arrays\[1\] is read-only"),
    (lambda xs: (xs + [xs[0]], 0.1), ValueError, "share memory"),
    (lambda xs: (xs + [xs[1].reshape(-1)[2:]], 0.1), ValueError, "share memory"),
]


@pytest.mark.parametrize("make, exc, message", BAD)
def test_clip_refuses_and_changes_nothing(make, exc, message):
    xs = _three()
    before = [x.copy() for x in xs]
    with pytest.raises(exc, match=message):
        clip_by_global_norm(*make(xs))
    for x, b in zip(xs, before, strict=True):
        assert_same_bits(x, b)


def test_refusals_of_read_only_functions():
    with pytest.raises(TypeError, match="x must be float32"):
        all_finite(np.zeros(3))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        all_finite([1.0])
    with pytest.raises(TypeError, match=r"arrays\[0\] must be float32"):
        global_norm([np.zeros(3, np.float16)])


def test_python_bodies_match_under_disable_jit():
    code = (
        "import numpy as np\n"
        "from kernels.norms import all_finite, clip_by_global_norm, global_norm\n"
        "x = np.random.default_rng(8).standard_normal(5000).astype(np.float32)\n"
        "y = x.copy(); y[4500] = np.inf\n"
        "t = clip_by_global_norm([x], 3.0)\n"
        "print(all_finite(x), all_finite(y), global_norm([y[:4000]]), t, x.view(np.uint32).sum())\n"
    )
    jit, plain = (out.split() for out in outputs_with_and_without_jit(code))
    # The kernel's sum of squares is reassociated over vector lanes (fastmath reassoc), so
    # its last bits differ from the Python loop's left-to-right sum; everything else is exact.
    assert jit[:2] == plain[:2] and jit[4] == plain[4]
    for a, b in zip(jit[2:4], plain[2:4], strict=True):
        assert math.isclose(float(a), float(b), rel_tol=1e-13)


# ---------------------------------------------------------------------------------------------
# Results recorded from torch 2.13.0 (CPU): float32 bit patterns.

P0 = hex32(
    "3e9c03e1 bf851e33 3f401d92 3f70c8d9 bff9bb85 bfa6add1 3e02e898 bea1ea8d bc89a295 "
    "bf5a6116 3f61203a"
)
G0 = hex32(
    "3f471d5f 3d873b1a 3f904971 3eef5d62 bf5bfa97 3ebccce7 bf757955 3f60e21e bd4c7f1d "
    "be3d4c8f bf2e5166"
)
CLIP_A = hex32(
    "3da1a2df be89ea01 3e470988 3e7975b4 bf015d74 beacaf2b 3d07a005 bda7bff9 bb8e980c "
    "be623f4a 3e693ca8"
)
CLIP_B = hex32(
    "3e4e49e4 3c8c1a64 3e957c43 3df7fd25 be63e78c 3dc39a4a be7e5171 3e68fc4f bc53dd45 "
    "bd441e8b be349935"
)
CLIP_TOTAL_TORCH = 3.8608949184417725  # float32
