"""Membership on its own: the start line, leaving and rejoining, and leases on a hand-moved
clock (the store calls it with its lock held; here nothing else runs)."""

import pytest

from ps.membership import Membership


class FakeClock:
    """A clock the test moves by hand, so that leases expire exactly when it says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_start_line_waits_for_every_live_worker():
    m = Membership(3, None, FakeClock())
    m.start(0)
    m.start(2)
    assert not m.all_started() and m.not_started() == [1]
    m.remove(1)  # a worker that died before it started holds nobody back
    assert m.all_started() and m.not_started() == []


def test_a_removed_worker_rejoins_on_its_next_call():
    m = Membership(2, None, FakeClock())
    assert m.remove(1) is True
    assert m.remove(1) is False  # already gone
    assert (m.live, m.rejoining) == ({0}, {1})
    assert m.rejoin(0) is False  # never left: nothing to do
    assert m.rejoin(1) is True
    assert (m.live, m.rejoining, m.started) == ({0, 1}, set(), {1})
    assert m.rejoin(1) is False


def test_a_lease_expires_after_lease_s_of_silence_but_not_during_a_call():
    clock = FakeClock()
    m = Membership(3, 10.0, clock)
    for w in range(3):
        with m.calling(w):
            pass  # each called at time 0
    with m.calling(0):  # worker 0 waits in a call from time 0 on
        clock.now = 10.0
        assert m.silent() == []  # exactly lease_s: not yet
        clock.now = 10.5
        assert m.silent() == [1, 2]
        m.remove(1)
        assert m.silent() == [2]  # only live workers expire
    assert m.last_seen[0] == 10.5  # the call ended now: a fresh lease
    clock.now = 20.5
    assert m.silent() == [2]
    clock.now = 21.0
    assert m.silent() == [0, 2]


def test_a_worker_that_never_called_has_no_lease_to_lose():
    clock = FakeClock()
    m = Membership(2, 1.0, clock)
    clock.now = 100.0
    assert m.silent() == []


def test_without_a_lease_nobody_expires():
    clock = FakeClock()
    m = Membership(2, None, clock)
    with m.calling(0):
        pass
    clock.now = 1e9
    assert m.silent() == []


def test_after_a_restore_every_worker_has_started_rejoins_and_holds_a_fresh_lease():
    clock = FakeClock()
    clock.now = 5.0
    m = Membership(3, 2.0, clock)
    m.restored()
    assert (m.started, m.rejoining, m.live) == ({0, 1, 2}, {0, 1, 2}, {0, 1, 2})
    assert m.last_seen == {0: 5.0, 1: 5.0, 2: 5.0}
    clock.now = 7.5
    assert m.silent() == [0, 1, 2]


def test_a_call_that_raises_still_ends():
    clock = FakeClock()
    m = Membership(1, 1.0, clock)
    with pytest.raises(RuntimeError), m.calling(0):
        clock.now = 3.0
        raise RuntimeError("refused")
    assert (m.in_flight[0], m.last_seen[0]) == (0, 3.0)
