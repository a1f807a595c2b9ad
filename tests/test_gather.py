"""Gathering a sync step on its own: when a step is complete, how its gradients combine, the
server-side noise, and skipped steps; exact answers from powers of two."""

import numpy as np
import pytest

from ps.gather import Gather, Step, parse_aggregate
from ps.keys import Key

KEY = Key("w", (4,), 0, 4)


def _g(x):
    return np.full(4, x, np.float32)


def _step(grads):
    step = Step()
    for w, g in grads.items():
        step.add(w, g)
    return step


def test_a_step_is_complete_once_every_live_worker_has_pushed_it():
    gather = Gather()
    pending = {0: _step({0: _g(1.0)})}
    next_step = np.array([1, 0, 0], np.int64)
    assert gather.next_complete(pending, 0, next_step, {0, 1, 2}) is None
    pending[0].add(1, _g(1.0))
    assert gather.next_complete(pending, 0, next_step, {0, 1, 2}) is None
    entry = pending[0]
    assert gather.next_complete(pending, 0, next_step, {0, 1}) is entry  # worker 2 removed
    assert 0 not in pending  # taken off


def test_backup_workers_complete_a_step_with_the_first_w_minus_b():
    gather = Gather(backup_workers=1)
    pending = {3: _step({2: _g(1.0), 0: _g(3.0)})}
    assert gather.next_complete(pending, 3, np.array([4, 3, 4]), {0, 1, 2}) is not None


def test_a_worker_past_the_step_whose_gradient_is_missing_is_not_waited_for():
    # Worker 1 is at step 8: its step 7 went to this server before a restart.
    pending = {7: _step({0: _g(1.0)})}
    assert Gather().next_complete(pending, 7, np.array([8, 8]), {0, 1}) is not None


def test_only_the_next_step_can_complete():
    pending = {5: _step({0: _g(1.0), 1: _g(1.0)})}
    assert Gather().next_complete(pending, 4, np.array([6, 6]), {0, 1}) is None


@pytest.mark.parametrize(("aggregate", "want"), [
    ("mean", (1.0 + 2.0 - 64.0 + 5.0 + 8.0) / 5),
    ("median", 2.0),
    ("trimmed_mean:0.2", (1.0 + 2.0 + 5.0) / 3),
])
def test_combine(aggregate, want):
    entry = _step({w: _g(x) for w, x in enumerate([1.0, 2.0, -64.0, 5.0, 8.0])})
    got = Gather(aggregate).combine(entry, KEY, 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(entry.grads[2], -64.0)  # the gradients are left as they were


def test_the_mean_of_one_gradient_is_a_copy():
    entry = _step({0: _g(0.5)})
    got = Gather().combine(entry, KEY, 0)
    got += 1.0
    np.testing.assert_array_equal(entry.grads[0], 0.5)


def test_seeded_noise_is_the_same_for_the_same_key_and_step_and_scaled_by_the_count():
    entry = _step({0: _g(0.0), 1: _g(0.0)})
    gather = Gather(dp_noise_std=2.0, dp_seed=7)
    a, b = gather.combine(entry, KEY, 3), gather.combine(entry, KEY, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gather.combine(entry, KEY, 4))
    noise = Gather(dp_noise_std=2.0, dp_seed=7)._noise(KEY, 3, 1)
    np.testing.assert_allclose(a, noise / 2, rtol=1e-6)  # std s / count


def test_a_skip_drops_the_step_for_everyone_and_later_gradients_are_not_kept():
    entry = _step({0: _g(1.0)})
    entry.add(2, None)
    entry.add(1, _g(3.0))
    entry.add(3, None)
    assert (entry.skipped_by, entry.grads, entry.workers) == (2, {}, {0, 1, 2, 3})


def test_a_gathered_gradient_is_copied_unless_owned():
    g = _g(1.0)
    entry = Step()
    entry.add(0, g)
    entry.add(1, g, owned=True)
    assert entry.grads[0] is not g and entry.grads[1] is g


@pytest.mark.parametrize(("text", "message"), [
    ("mode", "aggregate must be one of"),
    ("median:0.1", "takes no argument"),
    ("trimmed_mean", "needs a fraction"),
    ("trimmed_mean:0.5", r"must be in \[0, 0.5\)"),
])
def test_parse_aggregate_refuses_with_the_input_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_aggregate(text)
    assert parse_aggregate("trimmed_mean:0.25") == ("trimmed_mean", 0.25)
