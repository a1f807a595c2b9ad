"""kernels.dense against its twins, on awkward shapes and extreme logits."""

import numpy as np
import pytest
import twins.dense as twin
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kernels import bias_relu_forward, relu_backward, softmax_cross_entropy

SHAPES = [(1, 1), (3, 7), (64, 128), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_relu_forward_matches_twin_bit_for_bit(shape):
    rng = np.random.default_rng(0)
    z = rng.standard_normal(shape, dtype=np.float32)
    b = rng.standard_normal(shape[1], dtype=np.float32)
    got = bias_relu_forward(z, b)
    np.testing.assert_array_equal(got, twin.bias_relu_forward(z, b))


def test_bias_relu_forward_on_a_transposed_view():
    z = np.arange(12, dtype=np.float32).reshape(3, 4).T - 5  # non-contiguous (4, 3)
    b = np.array([1, -1, 0], np.float32)
    np.testing.assert_array_equal(bias_relu_forward(z, b), twin.bias_relu_forward(z, b))


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_matches_twin(shape):
    rng = np.random.default_rng(1)
    g = rng.standard_normal(shape, dtype=np.float32)
    a = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)
    np.testing.assert_array_equal(relu_backward(g, a), twin.relu_backward(g, a))


@settings(deadline=None, max_examples=50)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 12)),
           elements=st.floats(-1e4, 1e4, width=32)),
    st.randoms(use_true_random=False),
)
def test_softmax_cross_entropy_matches_twin(logits, random):
    labels = np.array([random.randrange(logits.shape[1]) for _ in range(logits.shape[0])])
    loss, d = softmax_cross_entropy(logits, labels)
    want_loss, want_d = twin.softmax_cross_entropy(logits, labels)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-6)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
    loss, d = softmax_cross_entropy(logits, np.array([1, 2]))
    want_loss, want_d = twin.softmax_cross_entropy(logits, np.array([1, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)  # (2e4 + log 3) / 2
    np.testing.assert_allclose(d, want_d, atol=1e-7)
    np.testing.assert_allclose(d.sum(axis=1), 0.0, atol=1e-7)  # softmax rows sum to one


def test_softmax_cross_entropy_gradient_by_finite_differences():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2])
    _, d = softmax_cross_entropy(logits, labels)
    eps = 1e-3
    for i, j in [(0, 0), (1, 4), (3, 1), (2, 3)]:
        up, down = logits.copy(), logits.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (twin.softmax_cross_entropy(up, labels)[0]
                   - twin.softmax_cross_entropy(down, labels)[0]) / (2 * eps)
        assert abs(numeric - d[i, j]) < 1e-4


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros((2, 3), np.float64), [0, 1], "float32"),
        (np.zeros((2, 3), np.float32), [0, 3], r"labels\[1\] = 3 is out of range for 3 classes"),
        (np.zeros((2, 3), np.float32), [0, -1], "out of range"),
        (np.zeros((2, 3), np.float32), [0], "2 integers"),
        (np.zeros((2, 3), np.float32), [0.0, 1.0], "integers"),
        (np.zeros((0, 3), np.float32), [], "non-empty"),
    ],
)
def test_softmax_cross_entropy_refuses_bad_input(logits, labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        softmax_cross_entropy(logits, np.asarray(labels))


def test_bias_relu_forward_refuses_mismatched_bias():
    with pytest.raises(ValueError, match="bias has 2 values but z has 3 columns"):
        bias_relu_forward(np.zeros((4, 3), np.float32), np.zeros(2, np.float32))
