"""DP-SGD's pieces: the per-example norm kernel against its twin, the model's clipped sum
against per-example gradients built one at a time, Poisson batches, and the noise."""

import numpy as np
import pytest
from jit import outputs_with_and_without_jit
from twins import privacy as twin

from kernels import outer_sq_norms
from worker.model import MLP
from worker.privacy import DPConfig, add_noise, poisson_batches


@pytest.mark.parametrize("batch, n_in, n_out", [(1, 1, 1), (7, 64, 128), (64, 128, 10),
                                                (0, 3, 4)])
def test_outer_sq_norms_matches_the_materialised_outer_products(batch, n_in, n_out):
    rng = np.random.default_rng(batch + n_in)
    a = rng.standard_normal((batch, n_in)).astype(np.float32)
    d = (rng.standard_normal((batch, n_out)) * 1e-3).astype(np.float32)
    np.testing.assert_allclose(outer_sq_norms(a, d), twin.outer_sq_norms(a, d), rtol=1e-12)


def test_outer_sq_norms_adds_into_out_and_refuses_bad_input():
    a = np.ones((2, 3), np.float32)
    d = np.full((2, 2), 2.0, np.float32)
    out = np.array([1.0, 0.5])
    assert outer_sq_norms(a, d, out=out) is out
    np.testing.assert_array_equal(out, [1.0 + 3 * 8, 0.5 + 3 * 8])
    with pytest.raises(TypeError, match="a must be a float32 array"):
        outer_sq_norms(a.astype(np.float64), d)
    with pytest.raises(ValueError, match="one row per example: 2 != 3"):
        outer_sq_norms(a, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="out must be float64"):
        outer_sq_norms(a, d, out=np.zeros(2, np.float32))


def test_outer_sq_norms_compiled_and_interpreted_agree():
    code = ("import numpy as np; from kernels import outer_sq_norms; "
            "r = np.random.default_rng(1); a = r.standard_normal((5, 9)).astype(np.float32); "
            "d = r.standard_normal((5, 4)).astype(np.float32); "
            "print(outer_sq_norms(a, d).tobytes().hex())")
    compiled, interpreted = outputs_with_and_without_jit(code)
    assert compiled == interpreted


@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6])
def test_the_clipped_sum_equals_per_example_gradients_clipped_one_at_a_time(clip):
    model = MLP((6, 8, 5, 3), seed=1)
    params = model.init_params()
    rng = np.random.default_rng(2)
    X = rng.standard_normal((9, 6)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    loss, grads, norms = model.clipped_grad_sum(params, X, y, clip)
    expected = {name: np.zeros(v.shape) for name, v in params.items()}
    for i in range(len(X)):
        _, g = model.loss_and_grads(params, X[i:i + 1], y[i:i + 1])
        norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values()))
        assert norms[i] == pytest.approx(norm, rel=1e-5)
        for name in expected:
            expected[name] += g[name] * min(1.0, clip / (norm + 1e-6))
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(model.loss_and_grads(params, X, y)[0], rel=1e-6)
    if clip == 0.05:  # every example was clipped: each contributes norm 0.05 at most
        total = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in grads.values()))
        assert total <= 0.05 * len(X) * (1 + 1e-5)


def test_an_empty_poisson_batch_gives_a_zero_sum():
    model = MLP((4, 3))
    loss, grads, norms = model.clipped_grad_sum(
        model.init_params(), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 1.0)
    assert np.isnan(loss) and norms.size == 0
    assert all(not g.any() for g in grads.values())


def test_poisson_batches_include_each_example_with_the_rate():
    rng = np.random.default_rng(0)
    draws = [next(b) for b in [poisson_batches(1000, 0.05, rng)] for _ in range(400)]
    sizes = np.array([len(d) for d in draws])
    assert abs(sizes.mean() - 50) < 1.5  # 400 draws: std of the mean ~0.35
    assert sizes.std() > 3  # batch sizes vary, as Poisson sampling makes them
    counts = np.bincount(np.concatenate(draws), minlength=1000)
    assert abs(counts.mean() - 20) < 0.5
    with pytest.raises(ValueError, match="sampling rate must be in"):
        next(poisson_batches(10, 0.0, rng))


def test_noise_has_the_asked_standard_deviation():
    grads = {"w": np.zeros((200, 100), np.float32), "b": np.zeros(5000, np.float32)}
    add_noise(grads, 0.3, np.random.default_rng(0))
    for g in grads.values():
        assert g.std() == pytest.approx(0.3, rel=0.03)
        assert abs(g.mean()) < 0.02


@pytest.mark.parametrize("settings, message", [
    ({"noise": -1.0, "clip": 1.0}, "noise .* must be >= 0"),
    ({"noise": 1.0, "clip": 0.0}, "clip .* must be > 0"),
    ({"noise": 1.0, "clip": 1.0, "delta": 1.0}, "delta must be in"),
    ({"noise": 1.0, "clip": 1.0, "noise_at": "client"}, "noise_at must be one of"),
])
def test_bad_dp_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DPConfig(**settings)
