"""The consistency rules on their own, with exact answers; and the store never reading a mode
string (the rules are the one place that knows what sync, async and ssp mean)."""

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ps.consistency import (
    EVERY_WORKER,
    MODES,
    Arrival,
    AsyncRule,
    SSPRule,
    SyncRule,
    clock,
    make_rule,
    slowest_clock,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeKey:
    """A key as a rule sees it: its updates applied and each worker's next step."""

    version: int
    next_step: np.ndarray


def _keys(*clocks, version=0):
    """One key per row of per-worker clocks, all at `version`."""
    return [FakeKey(version, np.array(c, np.int64)) for c in clocks]


def test_a_workers_clock_is_its_slowest_key_and_the_slowest_live_worker_sets_the_pace():
    keys = _keys([3, 5, 9], [4, 2, 9])
    assert [clock(w, keys) for w in range(3)] == [3, 2, 9]
    assert slowest_clock(keys, {0, 2}) == 3
    assert slowest_clock(keys, {0, 1, 2}) == 2
    assert slowest_clock(keys, set()) == float("inf")  # nobody live holds anyone back


def test_ssp_k2_answers_a_pull_of_step_5_when_the_slowest_clock_is_3_not_at_2():
    rule = SSPRule(2)
    assert not rule.ready(5, _keys([5, 2]), {0, 1})
    assert rule.ready(5, _keys([5, 3]), {0, 1})
    assert rule.ready(5, _keys([5, 2]), {0})  # worker 1 removed: not waited for


def test_ssp_k0_waits_for_every_live_worker_to_finish_the_previous_step():
    rule = SSPRule(0)
    assert not rule.ready(3, _keys([3, 2, 3]), {0, 1, 2})
    assert rule.ready(3, _keys([3, 3, 3]), {0, 1, 2})


def test_ssp_reads_clocks_key_by_key():
    # Worker 1 has pushed step 3 to the first key but not the second: its clock is 3 for the
    # first alone, 2 for both.
    keys = _keys([4, 4], [4, 3])
    rule = SSPRule(1)
    assert rule.ready(5, keys[:1], {0, 1})  # 4 >= 5 - 1
    assert not rule.ready(5, keys, {0, 1})  # 3 < 5 - 1


def test_sync_answers_a_pull_of_step_t_once_every_key_has_t_updates():
    rule = SyncRule()
    keys = _keys([2, 2], version=2) + _keys([2, 2], version=1)
    assert rule.ready(1, keys, {0, 1})
    assert not rule.ready(2, keys, {0, 1})
    assert rule.ready(2, keys[:1], {0, 1})


def test_async_answers_every_pull_at_once():
    rule = AsyncRule()
    assert rule.ready(10**6, _keys([0, 0]), {0, 1})
    assert (rule.waits, SyncRule.waits, SSPRule(3).waits) == (False, True, True)


def test_where_a_rejoining_worker_starts():
    # Worker 1 was away; worker 0 got to clock 7, the keys to version 6 (one step gathering).
    keys = _keys([7, 2], version=6)
    assert SyncRule().start_step(1, keys, {0}) == 6  # the first step still open
    assert SSPRule(2).start_step(1, keys, {0}) == 7  # where the others are
    assert AsyncRule().start_step(1, keys, {0}) == 2  # its own clock
    assert SSPRule(2).start_step(0, keys, {0}) == 7  # no one else live: its own
    assert SyncRule().start_step(1, _keys([3, 9], version=3), {0}) == 9  # ahead: its own


def test_what_an_arriving_gradient_does():
    assert SyncRule().arrival(step=4, version=4) is Arrival.GATHER
    assert SyncRule().arrival(step=6, version=4) is Arrival.GATHER  # a step to come
    assert SyncRule().arrival(step=3, version=4) is Arrival.LATE  # applied without it
    assert AsyncRule().arrival(step=3, version=4) is Arrival.APPLY
    assert SSPRule(1).arrival(step=3, version=4) is Arrival.APPLY
    assert (SyncRule.gathers, AsyncRule.gathers, SSPRule(1).gathers) == (True, False, False)


def test_snapshot_clocks_leave_out_a_sync_step_still_gathering():
    key = _keys([5, 4, 4], version=4)[0]  # worker 0 has pushed step 4, the others not yet
    np.testing.assert_array_equal(SyncRule().snapshot_clocks(key), [4, 4, 4])
    for rule in (AsyncRule(), SSPRule(2)):
        got = rule.snapshot_clocks(key)
        np.testing.assert_array_equal(got, [5, 4, 4])
        got[0] = 0  # a copy
    assert key.next_step[0] == 5
    assert SyncRule().snapshot_clocks(key).dtype == np.int64


def test_a_sync_skip_is_everyones_and_an_async_or_ssp_skip_is_the_workers():
    assert SyncRule().skip_mark(0, 3) == SyncRule().skip_mark(2, 3) == (EVERY_WORKER, 3)
    for rule in (AsyncRule(), SSPRule(1)):
        assert rule.skip_mark(0, 3) == (0, 3) != rule.skip_mark(2, 3)


def test_make_rule_is_the_one_reader_of_a_mode_string():
    assert [make_rule(m, 3).name for m in MODES] == list(MODES)
    assert isinstance(make_rule("sync"), SyncRule)
    assert isinstance(make_rule("async"), AsyncRule)
    assert make_rule("ssp", 3).staleness == 3
    with pytest.raises(ValueError, match="mode must be one of sync, async, ssp, got 'bsp'"):
        make_rule("bsp")
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        SSPRule(-1)


# -- the store asks its rule ---------------------------------------------------------------


def _mode_tests(path: Path) -> list[str]:
    """Places in a module that compare a mode: a name or attribute `mode`, or one of the mode
    strings, on either side of ==, !=, in or not in."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        if any(isinstance(side, ast.Name) and side.id == "mode"
               or isinstance(side, ast.Attribute) and side.attr == "mode"
               or isinstance(side, ast.Constant) and side.value in MODES
               for side in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_module_of_ps_tests_a_mode_string_but_the_factory_and_the_config_check():
    found = {p.name: _mode_tests(p) for p in sorted((ROOT / "ps").glob("*.py"))}
    tests = {name: places for name, places in found.items() if places}
    # consistency.py: make_rule; store_config.py: "mode must be one of ..." (MODES)
    assert set(tests) <= {"consistency.py", "store_config.py"}, tests
    assert len(tests.get("store_config.py", [])) == 1, tests  # `self.mode not in MODES`
    assert not _mode_tests(ROOT / "ps" / "store.py")


def test_the_mode_checker_sees_a_mode_test(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(config, m):\n    if config.mode == 'sync':\n        return 1\n"
                   "    return m != 'ssp'\n")
    assert _mode_tests(bad) == ["bad.py:2", "bad.py:4"]
