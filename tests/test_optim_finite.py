"""The optimizer kernels' keep_finite and dry_run passes against their twin (twins.optim.checked):
an update that would make any weight or state value inf or NaN writes nothing and says so."""

import numpy as np
import pytest
from bits import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from jit import outputs_with_and_without_jit
from twins import optim as twin

from kernels.optim import _CHUNK, adam_update, amax, sgd_update
from kernels.optim_codes import (
    _sgd_bf16_kernel,
    _sgd_fp16_hw_kernel,
    _sgd_fp16_kernel,
    sgd_update_codes,
)
from kernels.precision import HARDWARE_HALF, bf16_encode, fp16_encode

F32_MAX = float(np.finfo(np.float32).max)
# Awkward floats: near float32's largest, subnormals, zeros of both signs, ordinary ones.
AWKWARD = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                    st.sampled_from([F32_MAX, -F32_MAX, 3.0e38, 1e-45, -0.0, 1e20, -1e21]))


def _same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for a, b in zip(got, want, strict=True):
        assert_same_bits(a, b)


@settings(deadline=None, max_examples=80)
@given(st.integers(0, 30).flatmap(lambda n: st.tuples(*[arrays(np.float32, n, elements=AWKWARD)]
                                                      * 3)),
       st.sampled_from([0.0, 0.9]), st.booleans(), st.sampled_from([0.0, 1e-4]),
       st.sampled_from([0.1, 10.0, 1e30]))
def test_sgd_keep_finite_is_the_twin_bit_for_bit(arrs, momentum, nesterov, wd, lr):
    param, grad, buf = arrs
    nesterov = nesterov and momentum > 0
    for dry_run in (False, True):
        pk, bk, pt, bt = param.copy(), buf.copy(), param.copy(), buf.copy()
        got = sgd_update(pk, grad, lr, momentum, bk, wd, nesterov, keep_finite=True,
                         dry_run=dry_run)
        want = twin.checked(twin.sgd_update, (pt, grad, lr, momentum, bt, wd, nesterov), (0, 4),
                            dry_run=dry_run)
        assert got == want
        _same([pk, bk], [pt, bt])
        if dry_run or not got:  # nothing written
            _same([pk, bk], [param, buf])
        assert np.isfinite(pk).all() and np.isfinite(bk).all()


@settings(deadline=None, max_examples=80)
@given(st.integers(0, 30).flatmap(lambda n: st.tuples(*[arrays(np.float32, n, elements=AWKWARD)]
                                                      * 4)),
       st.integers(1, 5), st.sampled_from([0.0, 0.01, 3000.0]), st.booleans())
def test_adam_keep_finite_is_the_twin_bit_for_bit(arrs, step, wd, decoupled):
    param, grad, m, v = arrs
    v = np.abs(v)
    for dry_run in (False, True):
        k = [param.copy(), m.copy(), v.copy()]
        t = [param.copy(), m.copy(), v.copy()]
        got = adam_update(k[0], grad, k[1], k[2], step, 1e-3, weight_decay=wd,
                          decoupled=decoupled, keep_finite=True, dry_run=dry_run)
        want = twin.checked(twin.adam_update, (t[0], grad, t[1], t[2], step, 1e-3),
                            (0, 2, 3), dry_run=dry_run, weight_decay=wd, decoupled=decoupled)
        assert got == want
        _same(k, t)
        if dry_run or not got:
            _same(k, [param, m, v])


@settings(deadline=None, max_examples=80)
@given(st.integers(0, 30).flatmap(lambda n: st.tuples(arrays(np.float32, n, elements=AWKWARD),
                                                      arrays(np.uint16, n))),
       st.sampled_from(["float16", "bfloat16"]),
       st.sampled_from([1.0, 3.0, 2.0**-24, 1e-30, float(np.float32(1e-40))]))
def test_sgd_update_codes_keep_finite_is_the_twin_bit_for_bit(arrs, fmt, scale):
    param, codes = arrs
    for dry_run in (False, True):
        pk, pt = param.copy(), param.copy()
        got = sgd_update_codes(pk, codes, fmt, 0.1, scale, keep_finite=True, dry_run=dry_run)
        want = twin.checked(twin.sgd_update_codes, (pt, codes, fmt, 0.1, scale), (0,),
                            dry_run=dry_run)
        assert got == want
        _same([pk], [pt])
        if dry_run or not got:
            _same([pk], [param])


@pytest.mark.skipif(not HARDWARE_HALF, reason="this CPU has no float32 <-> half instructions")
def test_both_fp16_decoders_refuse_alike():
    codes = fp16_encode(np.array([65504.0, 1.0, -2.0], np.float32))
    for scale in (1e-36, 1.0):
        answers = [kernel(np.ones(3, np.float32), codes, np.float32(-0.1), np.float32(scale),
                          scale != 1.0, np.float32(1), False, True, False)
                   for kernel in (_sgd_fp16_kernel, _sgd_fp16_hw_kernel)]
        assert answers == [scale == 1.0] * 2


@pytest.mark.parametrize("at", [0, _CHUNK - 1, _CHUNK, 3 * _CHUNK + 17])
def test_one_overflow_anywhere_writes_nothing_at_all(at):
    # The check covers every chunk before the first write: no half-applied update.
    n = 4 * _CHUNK
    rng = np.random.default_rng(1)
    param, grad = rng.standard_normal((2, n)).astype(np.float32)
    param[at], grad[at] = -3.0e38, 3.0e38  # -3e38 - 0.5 * 3e38 overflows
    buf, m, v = np.full(n, -0.0, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    before = [param.copy(), buf.copy()]
    assert not sgd_update(param, grad, 0.5, keep_finite=True)
    assert not sgd_update(param, grad, 0.5, 0.9, buf, keep_finite=True)
    _same([param, buf], before)
    g16 = grad.copy()
    g16[at] = 60000.0
    for fmt, encode in (("float16", fp16_encode), ("bfloat16", bf16_encode)):
        # fp16/bf16 codes: an ordinary gradient divided by a tiny loss scale overflows.
        assert not sgd_update_codes(param, encode(g16), fmt, 0.5, 1e-35, keep_finite=True)
    assert not adam_update(param, np.where(np.arange(n) == at, np.float32(1e21), grad), m, v, 1,
                           1e-3, keep_finite=True)  # v = 0.001 * g^2 overflows, param does not
    _same([param, m, v], [before[0], np.zeros(n, np.float32), np.zeros(n, np.float32)])
    assert not _sgd_bf16_kernel(param, bf16_encode(grad), np.float32(-0.5), np.float32(1.0),
                                False, np.float32(1), False, True, False)
    _same([param], [before[0]])


def test_repeated_huge_steps_stop_before_inf():
    # The example as a kernel sees it: 3.4e38 again and again with lr 0.1 walks the
    # weight down by 3.4e37 a step; the step that would pass -float32 max is not written.
    param = np.zeros(5, np.float32)
    grad = np.full(5, 3.4e38, np.float32)
    plain = param.copy()
    for _ in range(10):
        sgd_update(plain, grad, 0.1)
    written = [sgd_update(param, grad, 0.1, keep_finite=True) for _ in range(12)]
    assert written == [True] * 10 + [False] * 2
    assert_same_bits(param, plain)  # the tenth step's weights, about -3.4e38, kept
    assert np.isfinite(param).all() and param[0] < -3.3e38


def test_without_keep_finite_the_kernels_still_do_as_torch():
    param, grad = np.zeros(2, np.float32), np.full(2, 3.4e38, np.float32)
    with np.errstate(over="ignore"):
        assert sgd_update(param, grad, 10.0) is True
    assert np.isneginf(param).all()


def test_keep_finite_means_the_same_under_disable_jit():
    code = (
        "import numpy as np\n"
        "from kernels.optim import adam_update, sgd_update\n"
        "from kernels.optim_codes import sgd_update_codes\n"
        "p = np.array([1.0, -3e38, 2.0], np.float32); g = np.array([1.0, 3e38, 1e21], np.float32)\n"
        "b = np.full_like(p, -0.0); m = np.zeros_like(p); v = np.zeros_like(p)\n"
        "c = np.array([0x3c00, 0x7bff, 0], np.uint16)\n"
        "print([sgd_update(p, g, 0.5, 0.9, b, keep_finite=True),\n"
        "       sgd_update(p, g * 0, 0.5, 0.9, b, keep_finite=True),\n"
        "       adam_update(p, g, m, v, 1, 1e-3, keep_finite=True),\n"
        "       sgd_update_codes(p, c, 'float16', 0.1, 1e-36, dry_run=True),\n"
        "       sgd_update_codes(p, c, 'bfloat16', 0.1, 1.0, keep_finite=True)])\n"
        "print(np.concatenate([p, b, m, v]).view(np.uint32).tolist())\n"
    )
    outs = outputs_with_and_without_jit(code)
    assert outs[0] == outs[1]


@settings(deadline=None, max_examples=100)
@given(arrays(np.float32, st.integers(0, 9000), elements=st.floats(width=32)))
def test_amax_is_the_twin(x):
    # Any floats, NaN and inf among them, across the chunk boundary.
    got, want = amax(x), twin.amax(x)
    assert (np.isnan(got) and np.isnan(want)) or got == want
