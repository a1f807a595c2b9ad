"""The MLP: shapes and names, He initialisation, gradients by finite differences."""

import numpy as np
import pytest
from twins.model import mlp_loss

from worker.model import MLP


def _batch(model, rows=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, model.sizes[0]), dtype=np.float32)
    y = rng.integers(0, model.sizes[-1], rows)
    return X, y


def test_params_are_named_and_shaped_by_layer():
    params = MLP((64, 128, 32, 10), seed=0).init_params()
    assert {k: v.shape for k, v in params.items()} == {
        "dense0.weight": (64, 128), "dense0.bias": (128,),
        "dense1.weight": (128, 32), "dense1.bias": (32,),
        "dense2.weight": (32, 10), "dense2.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in params.values())


def test_init_is_he_normal_and_seeded():
    a = MLP((400, 300, 10), seed=3).init_params()
    b = MLP((400, 300, 10), seed=3).init_params()
    c = MLP((400, 300, 10), seed=4).init_params()
    np.testing.assert_array_equal(a["dense0.weight"], b["dense0.weight"])
    assert not np.array_equal(a["dense0.weight"], c["dense0.weight"])
    assert abs(a["dense0.weight"].std() - np.sqrt(2 / 400)) < 0.01 * np.sqrt(2 / 400) * 5
    assert not a["dense0.bias"].any()


@pytest.mark.parametrize("sizes", [(5, 3), (5, 7, 4), (6, 8, 5, 3)])
def test_gradients_match_finite_differences(sizes):
    model = MLP(sizes, seed=1)
    params = model.init_params()
    for name in params:  # non-zero biases so that their gradients are tested too
        params[name] += np.float32(0.1) * np.random.default_rng(7).standard_normal(
            params[name].shape, dtype=np.float32)
    X, y = _batch(model)
    loss, grads = model.loss_and_grads(params, X, y)
    assert loss == pytest.approx(mlp_loss(params, X, y, model.n_layers), rel=1e-5)
    eps = 1e-4
    for name, p in params.items():
        numeric = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            up = {k: v.astype(np.float64) for k, v in params.items()}
            down = {k: v.astype(np.float64) for k, v in params.items()}
            up[name][idx] += eps
            down[name][idx] -= eps
            numeric[idx] = (mlp_loss(up, X, y, model.n_layers)
                            - mlp_loss(down, X, y, model.n_layers)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-3, atol=1e-5, err_msg=name)


def test_evaluate_and_predict_agree():
    model = MLP((5, 7, 4), seed=2)
    params = model.init_params()
    X, y = _batch(model, rows=5000)  # more rows than one evaluation chunk
    loss, acc = model.evaluate(params, X, y)
    assert acc == pytest.approx(np.mean(model.predict(params, X) == y))
    assert loss == pytest.approx(mlp_loss(params, X, y, model.n_layers), rel=1e-5)


@pytest.mark.parametrize(
    ("sizes", "message"), [((5,), "input and an output"), ((5, 0, 3), "must be >= 1")]
)
def test_bad_sizes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        MLP(sizes)


def test_wrong_input_width_is_refused():
    model = MLP((5, 3))
    with pytest.raises(ValueError, match=r"X must have shape \(batch, 5\), got \(2, 4\)"):
        model.loss_and_grads(model.init_params(), np.zeros((2, 4), np.float32), [0, 1])


@pytest.mark.parametrize("sizes", [(64, 128, 10), (5, 7, 4, 3), (6, 3)])
def test_the_mlp_as_a_sequential_gives_the_old_mlps_bits(sizes):
    """The same init draws, and the same bits of loss, gradients and underflow counts in every
    precision and of DP-SGD's clipped sums, as the MLP before layers (twins/mlp_v1.py)."""
    from twins.mlp_v1 import OldMLP

    from worker.precision import Precision

    old, new = OldMLP(sizes, seed=3), MLP(sizes, seed=3)
    params = new.init_params()
    old_params = old.init_params()
    assert list(params) == list(old_params) and new.param_shapes() == old.param_shapes()
    for name in params:
        assert params[name].tobytes() == old_params[name].tobytes(), name
    X, y = _batch(new, rows=33, seed=4)
    for precision in ("fp32", "fp16", "bf16"):
        counts, old_counts = {}, {}
        loss, grads = new.loss_and_grads(params, X, y, Precision(precision), 1024.0, counts)
        old_loss, old_grads = old.loss_and_grads(params, X, y, Precision(precision), 1024.0,
                                                 old_counts)
        assert (loss, counts) == (old_loss, old_counts)
        for name in grads:
            assert grads[name].tobytes() == old_grads[name].tobytes(), (precision, name)
    loss, grads, norms = new.clipped_grad_sum(params, X, y, 0.5)
    old_loss, old_grads, old_norms = old.clipped_grad_sum(params, X, y, 0.5)
    assert loss == old_loss and norms.tobytes() == old_norms.tobytes()
    for name in grads:
        assert grads[name].tobytes() == old_grads[name].tobytes(), name
    assert new.evaluate(params, X, y) == old.evaluate(params, X, y)
