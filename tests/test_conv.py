"""kernels.conv against its twins: im2col and col2im on strides, paddings and odd shapes,
max-pooling with ties and NaN; and relu_forward against its twin."""

import numpy as np
import pytest
import twins.conv as twin
import twins.dense as dense_twin

from kernels import col2im, im2col, maxpool_backward, maxpool_forward, relu_forward

# (x shape, kernel, stride, padding)
WINDOWS = [((1, 1, 1, 1), 1, 1, 0), ((2, 3, 5, 5), 3, 1, 1), ((2, 2, 4, 4), 3, 2, 1),
           ((1, 2, 3, 7), 2, 1, 0), ((3, 1, 8, 8), 3, 2, 0), ((1, 1, 2, 2), 3, 1, 1),
           ((2, 2, 6, 5), 5, 3, 2)]


@pytest.mark.parametrize(("shape", "k", "stride", "pad"), WINDOWS)
def test_im2col_matches_twin_bit_for_bit(shape, k, stride, pad):
    x = np.random.default_rng(0).standard_normal(shape, np.float32)
    np.testing.assert_array_equal(im2col(x, k, stride, pad), twin.im2col(x, k, stride, pad))


@pytest.mark.parametrize(("shape", "k", "stride", "pad"), WINDOWS)
def test_col2im_matches_twin_and_is_the_adjoint_of_im2col(shape, k, stride, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, np.float32)
    cols = rng.standard_normal(im2col(x, k, stride, pad).shape, np.float32)
    got = col2im(cols, shape, k, stride, pad)
    # Both add each window's values in the same (batch, row, column) order: the same bits.
    np.testing.assert_array_equal(got, twin.col2im(cols, shape, k, stride, pad))
    # <im2col(x), cols> == <x, col2im(cols)>: the definition of the adjoint.
    left = np.sum(im2col(x, k, stride, pad).astype(np.float64) * cols)
    right = np.sum(x.astype(np.float64) * got)
    assert left == pytest.approx(right, rel=1e-5)


def test_im2col_of_a_non_contiguous_view():
    x = np.random.default_rng(2).standard_normal((3, 2, 5, 5), np.float32)[::2, :, ::-1]
    np.testing.assert_array_equal(im2col(x, 3, 1, 1), twin.im2col(x, 3, 1, 1))


@pytest.mark.parametrize(("shape", "k", "stride"), [((2, 3, 4, 4), 2, None), ((1, 2, 5, 5), 3, 2),
                                                    ((1, 1, 5, 7), 2, 1), ((2, 1, 3, 3), 3, None)])
def test_maxpool_matches_twin(shape, k, stride):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape, np.float32)
    out, argmax = maxpool_forward(x, k, stride)
    want_out, want_argmax = twin.maxpool_forward(x, k, stride)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(argmax, want_argmax)
    g = rng.standard_normal(out.shape, np.float32)
    np.testing.assert_array_equal(maxpool_backward(g, argmax, shape),
                                  twin.maxpool_backward(g, want_argmax, shape))


def test_maxpool_ties_go_to_the_first_maximum_and_nan_propagates():
    x = np.array([[[[1, 1, 0, np.nan], [1, 1, 5, 0]]]], np.float32)  # (1, 1, 2, 4)
    out, argmax = maxpool_forward(x, 2)
    assert out[0, 0, 0, 0] == 1 and argmax[0, 0, 0, 0] == 0  # four tied: the first
    assert np.isnan(out[0, 0, 0, 1]) and argmax[0, 0, 0, 1] == 3  # NaN beats 5, as in torch
    want_out, want_argmax = twin.maxpool_forward(x, 2)
    np.testing.assert_array_equal(argmax, want_argmax)
    np.testing.assert_array_equal(out, want_out)


def test_relu_forward_matches_twin_on_signed_zeros_and_nan():
    x = np.array([[-0.0, 0.0, -1.0, 2.5], [np.nan, np.inf, -np.inf, 1e-45]], np.float32)
    got = relu_forward(x)
    want = dense_twin.relu_forward(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # +0.0, never -0.0


@pytest.mark.parametrize(("call", "message"), [
    (lambda: im2col(np.zeros((2, 3, 4), np.float32), 3), "shape \\(batch, channels"),
    (lambda: im2col(np.zeros((1, 1, 4, 4), np.float64), 3), "float32"),
    (lambda: im2col(np.zeros((1, 1, 2, 2), np.float32), 5, 1, 1), "kernel 5 is larger"),
    (lambda: im2col(np.zeros((1, 1, 4, 4), np.float32), 3, 0), "stride >= 1"),
    (lambda: col2im(np.zeros((3, 9), np.float32), (1, 1, 4, 4), 3), "cols must be float32 of"),
    (lambda: maxpool_forward(np.zeros((1, 1, 1, 4), np.float32), 2), "larger than the padded"),
    (lambda: maxpool_backward(np.zeros((1, 1, 1, 1), np.float32), np.array([[[[9]]]]),
                              (1, 1, 2, 2)), "outside a 2x2 plane"),
])
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
