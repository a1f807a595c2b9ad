"""Weights stay finite, always: a grad_scale out of bounds is refused; an update that would make
a weight or optimizer state inf or NaN is refused whole (async, ssp: the step is not used up)
or skips its step (sync); the weights and state stay exactly as they were."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kernels import adam_update, bf16_encode, fp16_encode, sgd_update, sgd_update_codes
from ps.gather import Gather, Step
from ps.keys import Key
from ps.optimizer import Optimizer, OptimizerConfig
from ps.packed import Packed
from ps.store import Store
from ps.store_config import StoreConfig
from ps.store_errors import BadRequest

A = Key("dense0.weight", (4, 30), 0, 120)
B = Key("dense0.bias", (30,), 0, 30)
BIG = 3.4e38
OPTIMIZERS = [OptimizerConfig("sgd", lr=0.1), OptimizerConfig("momentum", lr=0.1),
              OptimizerConfig("adam", lr=0.1), OptimizerConfig("sgd", lr=0.1, weight_decay=0.01)]


def _store(mode="async", workers=1, optimizer=OPTIMIZERS[0], value=1.0, **kw):
    store = Store(StoreConfig(mode=mode, workers=workers,
                              staleness=1 if mode == "ssp" else 0, **kw))
    store.init([A, B], optimizer, {A.id: np.full(120, value, np.float32),
                                   B.id: np.full(30, value, np.float32)})
    return store


def _state(store) -> list[np.ndarray]:
    """Every weight and optimizer state array, copied."""
    snap = store.snapshot()
    out = []
    for ks in snap.keys:
        out.append(ks.value)
        out += [np.asarray(v) for _, v in sorted(ks.optimizer.items())]
    return out


def _assert_same(before, after):
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(a).all() for a in after)


def _grads(a, b=0.5, version=0):
    return {A.id: (np.full(120, a, np.float32), version), B.id: (np.full(30, b, np.float32),
                                                                  version)}


def _pushes_work_after(store, worker=0, step=0):
    """A normal push of `step` is still taken and applied (one worker)."""
    versions = store.key_versions(None)
    store.push(worker, step, _grads(0.5, 0.5, versions[0]))
    assert store.key_versions(None) == [v + 1 for v in versions]
    assert all(np.isfinite(a).all() for a in _state(store))


@pytest.mark.parametrize("scale", [1e-300, 1e-40, 2.0**-25, 2.0**65, 1e300])
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_grad_scale_out_of_bounds_is_refused_and_changes_nothing(scale, mode):
    store = _store(mode)
    before = _state(store)
    want = re.escape(f"grad_scale {scale:g} is outside [2**-24, 2**64]")
    with pytest.raises(BadRequest, match=want):
        store.push(0, 0, _grads(1.0), scale=scale)
    _assert_same(before, _state(store))
    store.push(0, 0, _grads(1.0), scale=2.0**-24)  # the bound itself, and step 0 is still open
    assert all(np.isfinite(a).all() for a in _state(store))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_no_number_is_refused_even_for_a_skipped_step(scale):
    store = _store()
    with pytest.raises(BadRequest, match="must be finite and > 0"):
        store.push(0, 0, {A.id: (np.zeros(0, np.float32), 0)}, scale=scale, skip=True)


def test_a_skipped_step_may_carry_a_tiny_scale():
    # A dynamic scaler that kept overflowing backs off below 2**-24; its skipped steps carry
    # no values, so nothing is divided, and they are taken.
    store = _store()
    store.push(0, 0, {A.id: (np.zeros(0, np.float32), 0), B.id: (np.zeros(0, np.float32), 0)},
               scale=2.0**-40, skip=True)
    assert store.was_skipped(0, 0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name + str(o.weight_decay))
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_the_issues_twelve_huge_pushes_never_make_weights_inf(mode, optimizer):
    # Twelve pushes of 3.4e38 at scale 1, sgd lr 0.1: the ones that would overflow are
    # refused, naming the key and the cause; the weights stay finite throughout.
    store = _store(mode, optimizer=optimizer)
    refused = 0
    step = 0
    for _ in range(12):
        before = _state(store)
        version = store.key_versions([A.id])[0]
        try:
            store.push(0, step, _grads(BIG, 0.5, version))
            step += 1
        except BadRequest as err:
            refused += 1
            assert "push dense0.weight[0:120]: the update would make weights non-finite" in str(
                err)
            assert f"worker step {step} may be sent again" in str(err)
            _assert_same(before, _state(store))
    assert refused >= 2
    assert all(np.isfinite(a).all() for a in _state(store))
    _pushes_work_after(store, step=step)


def test_no_key_of_a_refused_push_is_applied():
    # B's gradient is fine and comes first in the push; A's would overflow: neither applies.
    store = _store(value=-3.39e38)
    before = _state(store)
    grads = {B.id: (np.full(30, 1.0, np.float32), 0), A.id: (np.full(120, BIG, np.float32), 0)}
    with pytest.raises(BadRequest, match=r"dense0.weight\[0:120\].*past float32's range"):
        store.push(0, 0, grads)
    _assert_same(before, _state(store))
    assert store.key_versions(None) == [0, 0]
    assert store.stats()["updates"] == 0
    _pushes_work_after(store)


@pytest.mark.parametrize("scale", [2.0**-24, 1e-7])
def test_a_finite_gradient_over_a_small_scale_that_overflows_is_refused(scale):
    store = _store()
    before = _state(store)
    with pytest.raises(BadRequest, match=f"divided by grad_scale {scale:g} overflows float32"):
        store.push(0, 0, _grads(1e33), scale=scale)
    _assert_same(before, _state(store))
    _pushes_work_after(store)


def test_momentum_buffer_overflow_is_refused():
    # buf <- 0.9 buf + 3.5e37 heads for 3.5e38, past float32's largest (3.4e38): the buffer
    # overflows while the weight, with lr tiny, would not.
    store = _store(optimizer=OptimizerConfig("momentum", lr=1e-30, momentum=0.9))
    step = 0
    with pytest.raises(BadRequest, match="non-finite"):
        for step in range(100):  # noqa: B007 - the step refused is the one to retry
            before = _state(store)
            store.push(0, step, _grads(3.5e37, 0.0, store.key_versions([A.id])[0]))
    _assert_same(before, _state(store))
    buf = store.snapshot().keys[0].optimizer["buf"]
    assert np.abs(buf).max() > 1e38  # it got near the edge, and stopped there
    _pushes_work_after(store, step=step)


def test_adam_second_moment_overflow_is_refused_though_the_weight_would_not():
    # v = 0.001 * g^2 overflows for g = 1e21, while the step m / sqrt(v) stays small.
    store = _store(optimizer=OptimizerConfig("adam", lr=1e-3))
    before = _state(store)
    with pytest.raises(BadRequest, match="adam with lr 0.001 would take a weight or its "
                                         "optimizer state past float32's range"):
        store.push(0, 0, _grads(1e21))
    _assert_same(before, _state(store))
    assert store.snapshot().keys[0].optimizer["step"] == 0
    _pushes_work_after(store)


@pytest.mark.parametrize("fmt, encode", [("float16", fp16_encode), ("bfloat16", bf16_encode)])
@pytest.mark.parametrize("optimizer", [OptimizerConfig("sgd", lr=1e27),
                                       OptimizerConfig("momentum", lr=1e27),
                                       OptimizerConfig("adam", lr=1e38)], ids=lambda o: o.name)
def test_16_bit_codes_that_would_overflow_are_refused(fmt, encode, optimizer):
    # 60000 / 2**-24 is 1e12, finite: with the scale in bounds, 16-bit codes overflow only
    # with a huge step size. Plain sgd reads the codes in the update itself (the fused path);
    # the others decode.
    store = _store(optimizer=optimizer, value=-3.39e38)
    before = _state(store)
    codes = {A.id: (Packed(encode(np.full(120, 60000.0, np.float32)), fmt), 0),
             B.id: (Packed(encode(np.full(30, 1.0, np.float32)), fmt), 0)}
    with pytest.raises(BadRequest, match="non-finite"):
        store.push(0, 0, codes, scale=2.0**-24)
    _assert_same(before, _state(store))
    if optimizer.name != "adam":  # adam's step of 1e38 / (1 - beta1) is past float32 always
        _pushes_work_after(store)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name + str(o.weight_decay))
@pytest.mark.parametrize("scale", [1.0, 2.0**-24])
def test_sync_a_step_whose_mean_would_overflow_is_skipped_for_everyone(optimizer, scale):
    # Two finite gradients of 3.4e38 sum to inf: the step's combined update is not applied,
    # the step counts as skipped (versions advance, pulls say so), and the next step applies.
    store = _store("sync", workers=2, optimizer=optimizer)
    before = _state(store)
    for w in (0, 1):
        store.push(w, 0, _grads(BIG * scale, 0.5 * scale), scale=scale)
    # A's state is as it was; B, gathered and checked on its own, took its step.
    after = _state(store)
    half = len(after) // 2
    _assert_same(before[:half], after[:half])
    assert not np.array_equal(before[half], after[half])
    assert store.key_versions(None) == [1, 1]
    assert store.stats()["skipped_steps"] == 1 and store.stats()["updates"] == 1
    assert store.was_skipped(0, 0) and store.was_skipped(1, 0)
    for w in (0, 1):
        store.push(w, 1, _grads(0.5, 0.5, 1))
    assert store.key_versions(None) == [2, 2] and store.stats()["skipped_steps"] == 1
    assert not np.array_equal(_state(store)[0], before[0])


@pytest.mark.parametrize("fmt, encode", [("float16", fp16_encode), ("bfloat16", bf16_encode)])
def test_sync_16_bit_codes_over_a_small_scale_skip_the_step(fmt, encode):
    store = _store("sync", workers=2, value=-3.39e38,
                   optimizer=OptimizerConfig("sgd", lr=1e27))
    before = _state(store)
    for w in (0, 1):
        store.push(w, 0, {A.id: (Packed(encode(np.full(120, 60000.0, np.float32)), fmt), 0),
                          B.id: (Packed(encode(np.full(30, 1.0, np.float32)), fmt), 0)},
                   scale=2.0**-24)
    assert store.was_skipped(0, 0)
    np.testing.assert_array_equal(_state(store)[0], before[0])
    assert all(np.isfinite(a).all() for a in _state(store))


def test_sync_accumulated_steps_stop_at_the_edge():
    # Step after step of 1.7e38 (the mean of two, still finite) walks the weight towards
    # -inf by 1.7e37; every step that would cross is skipped, and the weight rests finite.
    store = _store("sync", workers=2)
    for step in range(24):
        for w in (0, 1):
            store.push(w, step, _grads(BIG / 2, 0.0, step))
    weights = _state(store)[0]
    assert np.isfinite(weights).all() and weights.min() < -3.0e38
    assert store.stats()["skipped_steps"] >= 4


# ---------------------------------------------------------------------------------------------
# The optimizer's bounds (ps/bounds.py) skip the check pass only where it would have passed:
# step after step, its answers and bits are those of the kernels' exact check.

BOUND_CONFIGS = [
    OptimizerConfig("sgd", lr=0.5), OptimizerConfig("sgd", lr=3e37, weight_decay=0.5),
    OptimizerConfig("momentum", lr=0.1, momentum=0.9, nesterov=True),
    OptimizerConfig("momentum", lr=1e30, momentum=0.5, weight_decay=0.01),
    OptimizerConfig("momentum", lr=0.1, momentum=0.0),
    OptimizerConfig("adam", lr=1e-3), OptimizerConfig("adam", lr=1e37, eps=1e-30, weight_decay=0.1),
    OptimizerConfig("adam", lr=0.1, beta1=0.0, beta2=0.0),
    # A denominator down at eps: tiny gradients, whose squares vanish, take huge steps.
    OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01),
    OptimizerConfig("adamw", lr=3.0, weight_decay=1.0),  # decay factor -2: |param| grows
    OptimizerConfig("adam", lr=3e38, beta1=0.0, beta2=0.0, eps=1e-45),  # last: see below
]
MAGNITUDES = st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 1e-3, 1.0, -7.5, 1e20, -1e21, 1e30, 3.0e38,
                              -3.4e38, float(np.finfo(np.float32).max)])


def _exact_step(cfg, param, state, grad):
    """The kernels' exact keep_finite step: the reference."""
    if cfg.name in ("adam", "adamw"):
        written = adam_update(param, grad, state["m"], state["v"], state["step"] + 1, cfg.lr,
                              cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay,
                              decoupled=cfg.name == "adamw", keep_finite=True)
        state["step"] += written
        return written
    if cfg.name == "momentum":
        return sgd_update(param, grad, cfg.lr, cfg.momentum, state["buf"], cfg.weight_decay,
                          cfg.nesterov, keep_finite=True)
    return sgd_update(param, grad, cfg.lr, weight_decay=cfg.weight_decay, keep_finite=True)


@settings(deadline=None, max_examples=150)
@given(st.integers(0, len(BOUND_CONFIGS) - 1),
       arrays(np.float32, 6, elements=MAGNITUDES),
       st.lists(arrays(np.float32, 6, elements=MAGNITUDES), min_size=1, max_size=8))
def test_the_bounds_answer_as_the_exact_check_step_after_step(which, start, grads):
    cfg = BOUND_CONFIGS[which]
    opt = Optimizer(cfg, {"w": (6,)})
    param, ref = start.copy(), start.copy()
    ref_state = {k: v.copy() if isinstance(v, np.ndarray) else v
                 for k, v in opt.state["w"].items()}
    for grad in grads:
        with np.errstate(all="ignore"):
            dry = opt.step("w", param, grad, dry_run=True)
            got = opt.step("w", param, grad, keep_finite=True)
            want = _exact_step(cfg, ref, ref_state, grad)
        assert dry == got == want
        np.testing.assert_array_equal(param.view(np.uint32), ref.view(np.uint32))
        for k, v in ref_state.items():
            np.testing.assert_array_equal(np.asarray(opt.state["w"][k]), np.asarray(v))


@settings(deadline=None, max_examples=100)
@given(arrays(np.float32, 6, elements=MAGNITUDES),
       st.lists(arrays(np.float32, 6, elements=st.floats(-65504, 65504, width=32)),
                min_size=1, max_size=6),
       st.sampled_from(["float16", "bfloat16"]), st.sampled_from([2.0**-24, 1.0, 3.0, 2.0**40]),
       st.sampled_from([0.1, 1e27, 3e38]))
def test_the_bounds_of_16_bit_codes_answer_as_the_exact_check(start, grads, fmt, scale, lr):
    opt = Optimizer(OptimizerConfig("sgd", lr=lr), {"w": (6,)})
    param, ref = start.copy(), start.copy()
    encode = fp16_encode if fmt == "float16" else bf16_encode
    for grad in grads:
        codes = encode(grad)
        with np.errstate(all="ignore"):
            got = opt.step_codes("w", param, codes, fmt, scale, keep_finite=True,
                                 codes_finite=True)
            want = sgd_update_codes(ref, codes, fmt, lr, scale, keep_finite=True)
        assert got == want
        np.testing.assert_array_equal(param.view(np.uint32), ref.view(np.uint32))


def test_an_unchecked_step_forgets_the_bounds():
    opt = Optimizer(OptimizerConfig("sgd", lr=1.0), {"w": (2,)})
    param = np.zeros(2, np.float32)
    assert opt.step("w", param, np.ones(2, np.float32), keep_finite=True)
    assert opt.bounds["w"] is not None
    opt.step("w", param, np.ones(2, np.float32))
    assert opt.bounds["w"] is None
    param[:] = -3.4e38  # written behind the optimizer's back after an unchecked step: measured
    assert not opt.step("w", param, np.full(2, 1e38, np.float32), keep_finite=True)


@pytest.mark.parametrize("grad", [-1e-40, 1e-42])
def test_the_bounds_see_an_adam_step_over_a_vanishing_denominator(grad):
    # v = g^2 underflows to 0, the denominator is eps = 1e-45: the step m / eps overflows,
    # though every value going in is tiny.
    cfg = BOUND_CONFIGS[-1]
    opt = Optimizer(cfg, {"w": (6,)})
    param = np.zeros(6, np.float32)
    g = np.full(6, grad, np.float32)
    ref = param.copy()
    want = _exact_step(cfg, ref, {"m": np.zeros(6, np.float32), "v": np.zeros(6, np.float32),
                                  "step": 0}, g)
    assert not want
    assert not opt.step("w", param, g, dry_run=True)
    assert not opt.step("w", param, g, keep_finite=True)
    np.testing.assert_array_equal(param, 0.0)
    assert opt.state["w"]["step"] == 0 and not opt.state["w"]["m"].any()


def test_a_negative_adam_second_moment_goes_to_the_exact_check():
    # v < 0 (a corrupt checkpoint) makes sqrt NaN: the bounds, which take v >= 0, step aside.
    opt = Optimizer(OptimizerConfig("adam", lr=1e-3), {"w": (3,)})
    opt.state["w"]["v"][:] = -1.0
    param = np.ones(3, np.float32)
    with np.errstate(invalid="ignore"):
        assert not opt.step("w", param, np.full(3, 0.5, np.float32), keep_finite=True)
    np.testing.assert_array_equal(param, 1.0)


@settings(deadline=None, max_examples=150)
@given(st.integers(1, 9).flatmap(lambda n: st.lists(arrays(np.float32, 5, elements=MAGNITUDES),
                                                    min_size=n, max_size=n)),
       st.sampled_from(["mean", "median", "trimmed_mean:0.25"]))
def test_a_sync_steps_combined_bound_holds_the_combined_update(grads, aggregate):
    gather = Gather(aggregate)
    entry = Step()
    for w, g in enumerate(grads):
        entry.add(w, g, bound=float(np.abs(g).max()))
    bound = gather.combined_bound(entry)
    with np.errstate(all="ignore"):
        update = gather.combine(entry, A, 0)
    if bound is not None:
        assert np.isfinite(update).all() and float(np.abs(update).max()) <= bound
    entry.add(len(grads), grads[0], bound=None)  # one gradient of unknown bound: none known
    assert gather.combined_bound(entry) is None
    assert Gather("mean", dp_noise_std=1.0).combined_bound(entry) is None
