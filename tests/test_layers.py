"""The layers of worker/layers.py and the Sequential that composes them: forward and backward
against PyTorch's values (recorded below), gradients by finite differences against a float64
twin, DP-SGD's clipped sums against a per-example loop, and the checks of a model's shapes."""

import numpy as np
import pytest
from twins.layers import loss64

from worker.layers import (
    Conv2d,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    MaxPool2d,
    ReLU,
    Tanh,
)
from worker.model_spec import build_model
from worker.precision import Precision
from worker.sequential import Sequential

FP32 = Precision("fp32")


def _f32(*values):
    return np.array(values, np.float32)


def _r(seed, shape):
    """The inputs the PyTorch values below were computed from."""
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


# Computed once with torch 2.13 (CPU): x, w, b, g = _r(...) as below, as tensors with
# requires_grad; y = the torch call named; (y * g).sum().backward(); the values are y and the
# .grad of each input, flattened.
# torch.nn.functional.conv2d(x, w, b, stride=2, padding=1): x = _r(1, (2, 2, 4, 4)),
# w = _r(2, (2, 2, 3, 3)), b = _r(3, (2,)), g = _r(4, (2, 2, 2, 2))
CONV_Y = _f32(
    4.0761642, 2.1132562, 0.9446493, 5.254855, -1.1711943, 5.636295, 0.49454737,
    -1.3464552, 3.922247, 2.0512397, 2.3342373, -2.2645442, -6.7039285, 4.214007,
    3.2770252, -0.13438877)
CONV_DX = _f32(
    0.22692262, 0.8747455, 1.0368674, 1.2800677, -0.39166248, 11.371346, 1.3675666,
    -4.207496, 0.5333879, 2.0579643, -0.36120018, -0.7788234, -0.5665804,
    -1.6363322, -0.078425735, 0.6968633, -6.3996744, -1.4519513, -0.5899618,
    1.3383174, -1.894813, -0.25606418, -0.5033641, -0.43476942, -5.2125807,
    -2.129542, 1.9927288, 0.27462316, -0.33994895, 2.080421, 0.40938625, -0.5335424,
    0.31875783, 0.04543618, 0.6889971, 0.5279394, 1.1046362, 4.6185765, 1.7136927,
    -3.0495794, 0.034171868, 0.31786394, -0.2658939, -0.3170254, -0.16489115,
    -1.6120973, -0.47138065, 1.0359288, 1.1263174, 1.0507505, 1.3402164, 1.6073614,
    -0.90922713, -2.4037774, -0.665145, -1.1223516, -0.7616963, -0.46629888,
    0.090975195, -0.36819923, 0.028082434, 0.94655794, 0.4617566, -0.10183593)
CONV_DW = _f32(
    -0.5379068, -2.493994, 1.4412934, 4.5377235, -3.1452842, -0.78869367,
    0.47078872, 5.3287034, -4.908992, -0.5898684, -0.019897938, 0.43012667,
    0.39981276, 1.8406048, 1.1009287, 1.5581868, -2.839372, -2.5528703, -0.589258,
    0.1719006, -0.053133577, 3.0300105, 3.0908475, -3.5166335, 1.6652129, 1.8988276,
    -2.805857, -0.83177716, 0.23573202, 0.43397588, 0.11591235, 0.6604955,
    0.8377597, 2.1862936, 1.3244424, 0.4559233)
CONV_DB = _f32(
    -6.5841637, -0.6691079)
# torch.nn.functional.conv2d(x, w, b, stride=1, padding=0): x = _r(5, (1, 1, 3, 5)),
# w = _r(6, (3, 1, 2, 2)), b = _r(7, (3,)), g = _r(8, (1, 3, 2, 4))
CONV1_Y = _f32(
    1.7359464, -0.3282467, 0.11713159, 4.4785237, 1.7947183, 4.707841, -2.6677406,
    5.1640244, -0.5219127, 3.5367506, -1.9509557, -2.3951855, -2.4258647, -4.00367,
    3.1655345, -7.2611547, 7.920973, 1.7776539, 6.058833, 2.784993, -0.9288321,
    -0.010798335, -4.7759385, -0.57616603)
CONV1_DX = _f32(
    0.76523983, 5.4597816, -2.221017, -0.29685307, -4.4615955, 0.4501977,
    0.0120943785, -1.6364962, 1.3585674, 3.0201392, 0.107271194, 1.4063019,
    -1.6412833, -3.408411, 0.28540114)
CONV1_DW = _f32(
    -4.1203694, -0.08326769, 7.0532207, -3.1632726, 7.343226, 2.5169134, -1.8983817,
    -3.0395052, -0.77830136, -3.0452561, 3.7754028, 3.5028217)
CONV1_DB = _f32(
    -1.9713874, -1.7429495, 1.433544)
# torch.nn.functional.max_pool2d(x, 2, 2): x = _r(9, (1, 2, 4, 4)), g = _r(109, (1, 2, 2, 2))
POOL_Y = _f32(
    2.0592158, 1.9882778, 1.4179415, 3.5798302, 0.024431411, 2.440052, 0.85868937,
    2.3756711)
POOL_DX = _f32(
    0, 1.3221976, 0, 0, 0, 0, -0.48989823, 0, 0, 0.50462854, 0, -2.3230822, 0, 0, 0,
    0, 0, 0.5319654, 0, 0, 0, 0, 0.93959045, 0, 0, 0, 0, 0, 0, -0.39342558, 0,
    -0.33538035)
# torch.nn.functional.max_pool2d(x, 3, 2): x = _r(10, (1, 1, 5, 5)), g = _r(110, (1, 1, 2, 2))
POOL3_Y = _f32(
    1.7426122, 0.6762282, 1.183951, 1.0560077)
POOL3_DX = _f32(
    0, 0, 0, 0, 0, 0.34030727, 0, 0, 0, 0, 0, 0, 2.258, 0, 0, 0, 0, 0, 0,
    -0.6454239, 0, 0.86859626, 0, 0, 0)
# torch.tanh(x): x = _r(11, (2, 3)) * 2, g = _r(12, (2, 3))
TANH_Y = _f32(
    0.3098345, 0.1611151, 0.97477823, 0.9218892, 0.94468385, -0.9932847)
TANH_DX = _f32(
    -0.5732892, 0.19120345, 0.08832054, 0.24823143, 0.009987065, 0.008171548)
# torch.manual_seed(0); torch.nn.functional.dropout(x, 0.4, training=True): x = _r(13, (4, 5)),
# g = _r(14, (4, 5))
DROP_Y = _f32(
    0, -0, -4.992457, -0, 0, 0, 1.1938967, 0.2939092, 0.60318804, -0.39674363,
    0.8981621, 3.5451057, 2.0200827, -0, 1.9828911, 0.008566338, -2.5405962,
    -3.6125298, 0, 0)
DROP_DX = _f32(
    0, 0, -1.2016463, 0, -0, -0, -1.9262654, 2.6463816, -1.5255858, -2.6652968,
    0.9824336, 3.5741928, 0.041018736, 0, 0.10907429, -0.9721658, 1.7582039,
    -0.5648429, -0, -0)


def _backward(layer, params, x, g):
    y, cache = layer.forward(params, x, FP32, True)
    dx, grads = layer.backward(params, cache, g, True)
    return y, dx, grads


@pytest.mark.parametrize(("case", "shapes", "stride", "pad", "want"), [
    ("stride 2, padding 1", ((2, 2, 4, 4), (2, 2, 3, 3), (2,), (2, 2, 2, 2)), 2, 1,
     (CONV_Y, CONV_DX, CONV_DW, CONV_DB)),
    ("stride 1, no padding", ((1, 1, 3, 5), (3, 1, 2, 2), (3,), (1, 3, 2, 4)), 1, 0,
     (CONV1_Y, CONV1_DX, CONV1_DW, CONV1_DB)),
])
def test_conv2d_forward_and_backward_match_torch(case, shapes, stride, pad, want):
    seeds = (1, 2, 3, 4) if stride == 2 else (5, 6, 7, 8)
    x, w, b, g = (_r(seed, shape) for seed, shape in zip(seeds, shapes, strict=True))
    out_ch, in_ch, k, _ = w.shape
    layer = Conv2d(in_ch, out_ch, k, stride=stride, padding=pad)
    assert layer.out_shape(x.shape[1:]) == g.shape[1:]
    y, dx, grads = _backward(layer, {"weight": w, "bias": b}, x, g)
    for got, expected in zip((y, dx, grads["weight"], grads["bias"]), want, strict=True):
        np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-5, atol=2e-6, err_msg=case)


@pytest.mark.parametrize(("shape", "k", "stride", "seed", "want_y", "want_dx"), [
    ((1, 2, 4, 4), 2, 2, 9, POOL_Y, POOL_DX), ((1, 1, 5, 5), 3, 2, 10, POOL3_Y, POOL3_DX)])
def test_maxpool2d_forward_and_backward_match_torch(shape, k, stride, seed, want_y, want_dx):
    layer = MaxPool2d(k, stride)
    x = _r(seed, shape)
    out_shape = layer.out_shape(shape[1:])
    y, dx, grads = _backward(layer, {}, x, _r(seed + 100, (1, *out_shape)))
    np.testing.assert_array_equal(y.reshape(-1), want_y)  # a max is exact
    np.testing.assert_array_equal(dx.reshape(-1), want_dx)
    assert grads == {}


def test_tanh_forward_and_backward_match_torch():
    y, dx, _ = _backward(Tanh(), {}, _r(11, (2, 3)) * 2, _r(12, (2, 3)))
    np.testing.assert_allclose(y.reshape(-1), TANH_Y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx.reshape(-1), TANH_DX, rtol=1e-5, atol=1e-7)


def test_dropout_given_torchs_mask_gives_torchs_values():
    x, g = _r(13, (4, 5)), _r(14, (4, 5))
    kept = (DROP_Y != 0).reshape(4, 5)  # the mask torch drew (no x is 0)
    layer = Dropout(0.4)
    y, mask = layer.forward({}, x, FP32, True, mask=kept / np.float32(0.6))
    dx, _ = layer.backward({}, mask, g, True)
    np.testing.assert_allclose(y.reshape(-1), DROP_Y, rtol=1e-6)
    np.testing.assert_allclose(dx.reshape(-1), DROP_DX, rtol=1e-6)


def test_dropout_drops_p_of_the_values_in_training_and_none_in_evaluation():
    x = np.ones((200, 50), np.float32)
    layer = Dropout(0.3, seed=5)
    y, _ = layer.forward({}, x, FP32, True)
    assert abs((y == 0).mean() - 0.3) < 0.02  # 10000 draws: 5 standard deviations is 0.023
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)  # inverted: the mean is kept
    again, _ = Dropout(0.3, seed=5).forward({}, x, FP32, True)
    np.testing.assert_array_equal(y, again)  # seeded
    same, cache = layer.forward({}, x, FP32, False)
    assert same is x and layer.backward({}, cache, x, True)[0] is x


def _perturbed(params, seed=7):
    """Parameters with non-zero biases, so that their gradients are tested too."""
    rng = np.random.default_rng(seed)
    return {name: v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32)
            for name, v in params.items()}


def _numeric(model, params, X, y, name, idx, eps=1e-6):
    up = {k: v.astype(np.float64) for k, v in params.items()}
    down = {k: v.astype(np.float64) for k, v in params.items()}
    up[name][idx] += eps
    down[name][idx] -= eps
    return (loss64(model, up, X, y) - loss64(model, down, X, y)) / (2 * eps)


MODELS = {
    "conv stride 2 padding 1, tanh": (
        lambda: [Conv2d(1, 3, 3, stride=2, padding=1), Tanh(), Flatten(), Dense(27, 4)],
        (1, 6, 6)),
    "two convs, relu, maxpool": (
        lambda: [Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(3, 2, 2), ReLU(),
                 Flatten(), Dense(2, 3)],
        (2, 4, 4)),
    "overlapping pool, dense tanh dense": (
        lambda: [MaxPool2d(3, 2), Flatten(), Dense(8, 5), Tanh(), Dense(5, 3)],
        (2, 5, 5)),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_gradients_match_finite_differences(case):
    layers, input_shape = MODELS[case]
    model = Sequential(layers(), input_shape, seed=1)
    params = _perturbed(model.init_params())
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3, model.n_features), np.float32)
    y = rng.integers(0, model.n_classes, 3)
    loss, grads = model.loss_and_grads(params, X, y)
    assert loss == pytest.approx(loss64(model, params, X, y), rel=1e-5)
    for name, p in params.items():
        numeric = np.array([_numeric(model, params, X, y, name, idx)
                            for idx in np.ndindex(p.shape)]).reshape(p.shape)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-3, atol=1e-6, err_msg=name)


def test_a_built_cnn_matches_finite_differences_on_sampled_weights(digits):
    model = build_model("cnn:3,4/6", 64, (8, 8), 10, seed=3)
    params = _perturbed(model.init_params())
    X, y = digits.X_train[:4], digits.y_train[:4]
    _, grads = model.loss_and_grads(params, X, y)
    rng = np.random.default_rng(4)
    for name, p in params.items():
        for flat in rng.choice(p.size, size=min(p.size, 6), replace=False):
            idx = np.unravel_index(flat, p.shape)
            assert grads[name][idx] == pytest.approx(
                _numeric(model, params, X, y, name, idx), rel=1e-3, abs=1e-6), (name, idx)


def test_embedding_looks_rows_up_and_adds_their_gradients():
    model = Sequential([Embedding(5, 3), Flatten(), Dense(6, 2)], (2,), seed=0)
    assert model.param_shapes() == {"embed0.weight": (5, 3), "dense0.weight": (6, 2),
                                    "dense0.bias": (2,)}
    params = model.init_params()
    X = np.array([[1, 4], [1, 1]], np.float32)  # id 1 three times, id 4 once
    y = np.array([0, 1])
    _, grads = model.loss_and_grads(params, X, y)
    table = params["embed0.weight"].astype(np.float64)
    for idx in np.ndindex(table.shape):
        up, down = table.copy(), table.copy()
        up[idx] += 1e-6
        down[idx] -= 1e-6

        def loss(t):
            h = t[X.astype(int)].reshape(2, 6) @ params["dense0.weight"] + params["dense0.bias"]
            h = h - h.max(axis=1, keepdims=True)
            return -(h - np.log(np.exp(h).sum(axis=1, keepdims=True)))[[0, 1], y].mean()

        assert grads["embed0.weight"][idx] == pytest.approx(
            (loss(up) - loss(down)) / 2e-6, rel=1e-3, abs=1e-7)
    assert not grads["embed0.weight"][[0, 2, 3]].any()  # untouched rows
    with pytest.raises(ValueError, match=r"ids must be whole numbers in 0\.\.4"):
        model.loss_and_grads(params, np.array([[1, 5]], np.float32), [0])


def _dp_model():
    layers = [Conv2d(1, 3, 3, stride=2, padding=1), ReLU(), Conv2d(3, 2, 3, padding=1), Tanh(),
              MaxPool2d(2), Flatten(), Dense(8, 5), ReLU(), Dense(5, 3)]
    return Sequential(layers, (1, 8, 8), seed=1)


@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_cnn_clipped_sum_equals_per_example_gradients_clipped_one_at_a_time(clip):
    model = _dp_model()
    params = _perturbed(model.init_params())
    rng = np.random.default_rng(2)
    X = rng.standard_normal((7, 64), np.float32)
    y = rng.integers(0, 3, 7)
    loss, grads, norms = model.clipped_grad_sum(params, X, y, clip)
    expected = {name: np.zeros(v.shape) for name, v in params.items()}
    for i in range(len(X)):
        _, g = model.loss_and_grads(params, X[i : i + 1], y[i : i + 1])
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))
        assert norms[i] == pytest.approx(norm, rel=1e-5)
        for name in expected:
            expected[name] += g[name] * min(1.0, clip / (norm + 1e-6))
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    assert loss == pytest.approx(model.loss_and_grads(params, X, y)[0], rel=1e-6)
    if clip == 0.05:
        assert (norms > clip).all()  # every example was clipped, so the test tests clipping


@pytest.mark.parametrize(("layers", "input_shape", "named"), [
    ([Dense(4, 6), Dropout(0.5), Dense(6, 3)], (4,), "layer 1 \\(Dropout"),
    ([Embedding(5, 2), Flatten(), Dense(4, 3)], (2,), "layer 0 \\(Embedding"),
])
def test_dp_refuses_a_layer_it_cannot_clip_exactly_naming_it(layers, input_shape, named):
    model = Sequential(layers, input_shape)
    with pytest.raises(ValueError, match=f"DP-SGD: {named}"):
        model.check_dp()
    X = np.zeros((2, model.n_features), np.float32)
    with pytest.raises(ValueError, match=f"DP-SGD: {named}"):
        model.clipped_grad_sum(model.init_params(), X, np.zeros(2, np.int64), 1.0)


def test_parameters_are_numbered_per_kind_in_order_and_drawn_he_normal():
    layers = [Conv2d(1, 4, 3, padding=1), ReLU(), Conv2d(4, 6, 3), Flatten(), Dense(24, 5),
              ReLU(), Dense(5, 2)]
    model = Sequential(layers, (1, 4, 4), seed=9)
    assert model.param_shapes() == {
        "conv0.weight": (4, 1, 3, 3), "conv0.bias": (4,), "conv1.weight": (6, 4, 3, 3),
        "conv1.bias": (6,), "dense0.weight": (24, 5), "dense0.bias": (5,),
        "dense1.weight": (5, 2), "dense1.bias": (2,)}
    params = model.init_params()
    rng = np.random.default_rng(9)  # one generator, layer by layer, weight then bias
    for name, fan_in in (("conv0", 9), ("conv1", 36), ("dense0", 24), ("dense1", 5)):
        shape = model.param_shapes()[f"{name}.weight"]
        want = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        np.testing.assert_array_equal(params[f"{name}.weight"], want)
        assert not params[f"{name}.bias"].any()


@pytest.mark.parametrize(("layers", "input_shape", "message"), [
    ([Flatten(), Dense(10, 3)], (1, 3, 3), r"Dense\(in_features=10.*gets \(9,\)"),
    ([Conv2d(1, 2, 5), Flatten(), Dense(2, 2)], (1, 3, 3), "kernel 5x5 is larger than its "
                                                          "input 3x3"),
    ([Conv2d(2, 2, 3)], (1, 4, 4), r"expects inputs of shape \(2, height, width\)"),
    ([Dense(4, 3), Embedding(3, 2)], (4,), "an Embedding must be the first layer"),
    ([Conv2d(1, 2, 3)], (1, 4, 4), r"the last layer gives shape \(2, 2, 2\)"),
    ([], (4,), "at least one layer"),
])
def test_shapes_that_do_not_fit_are_refused_when_the_model_is_built(layers, input_shape,
                                                                    message):
    with pytest.raises(ValueError, match=message):
        Sequential(layers, input_shape)


def test_wrong_input_width_is_refused():
    model = _dp_model()
    with pytest.raises(ValueError, match=r"X must have shape \(batch, 64\), got \(2, 63\)"):
        model.loss_and_grads(model.init_params(), np.zeros((2, 63), np.float32), [0, 1])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_cnn_in_16_bits_rounds_and_counts_yet_stays_near_fp32(precision, digits):
    model = build_model("cnn:4,8", 64, (8, 8), 10, seed=0)
    params = model.init_params()
    X, y = digits.X_train[:16], digits.y_train[:16]
    loss32, grads32 = model.loss_and_grads(params, X, y)
    counts = {}
    loss16, grads16 = model.loss_and_grads(params, X, y, Precision(precision), 1024.0, counts)
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-2)
    p = Precision(precision)
    for name, g in grads16.items():
        np.testing.assert_array_equal(p.round(g), g)  # held in 16 bits
        scale = np.abs(grads32[name]).max()
        np.testing.assert_allclose(g / 1024.0, grads32[name], atol=0.05 * scale, err_msg=name)
    assert counts["nonzero"] > 0 and 0 <= counts["underflow"] < counts["nonzero"]
