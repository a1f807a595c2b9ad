"""Init is checked whole before anything is allocated or kept: the memory budget, overlapping
keys, keys outside their tensor, one name with two shapes; a refused or failed init leaves the
store without a layout, so that a correct one afterwards succeeds."""

import numpy as np
import pytest

from ps.budget import budget_bytes, layout_bytes
from ps.keys import Key
from ps.optimizer import OptimizerConfig
from ps.shard import Shard
from ps.store import Store
from ps.store_config import StoreConfig
from ps.store_errors import BadRequest, ResourceExhausted

SGD = OptimizerConfig("sgd", lr=0.5)
ADAM = OptimizerConfig("adam", lr=1e-3)
GOOD = [Key("dense0.weight", (4, 3), 0, 12), Key("dense0.bias", (3,), 0, 3)]


def _good_init_works(store: Store) -> None:
    assert store.layout() == ()
    values = {k.id: np.ones(k.size, np.float32) for k in GOOD}
    assert store.init(GOOD, SGD, values).created
    assert store.layout() == tuple(GOOD)


@pytest.mark.parametrize("keys, optimizer, mode", [
    ([Key("w", (2**33,), 0, 2**33)], ADAM, "async"),  # the issue's: 96 GiB with adam
    ([Key("w", (2**40,), 0, 2**40)], SGD, "async"),  # the issue's: 4 TiB with sgd
    ([Key("w", (2**20, 2**20), 0, 2**40)], SGD, "sync"),
    ([Key(f"t{i}", (2**30,), 0, 2**30) for i in range(64)], SGD, "async"),  # many big keys
])
def test_a_layout_over_the_default_budget_is_refused_with_the_bytes(keys, optimizer, mode):
    store = Store(StoreConfig(mode=mode, workers=2))
    need, _ = layout_bytes(keys, optimizer.name, 2, mode == "sync")
    allowed = budget_bytes(None)
    assert need > allowed  # half of this machine's memory: far less than these
    with pytest.raises(ResourceExhausted, match=f"init: the layout needs {need} bytes .* more "
                                                f"than this server's memory budget of "
                                                f"{allowed} bytes"):
        store.init(keys, optimizer, {})
    _good_init_works(store)


def test_the_budget_counts_values_optimizer_state_and_a_sync_steps_gradients():
    key = [Key("w", (1000,), 0, 1000)]
    assert layout_bytes(key, "sgd", 4, False)[0] == 4000 + 1024
    assert layout_bytes(key, "momentum", 4, False)[0] == 8000 + 1024
    assert layout_bytes(key, "adam", 4, False)[0] == 12000 + 1024
    assert layout_bytes(key, "adam", 4, True)[0] == 12000 + 4 * 5 * 1000 + 1024  # W + mean


@pytest.mark.parametrize("optimizer, fits", [(SGD, True), (ADAM, False)])
def test_a_set_budget_is_the_line(optimizer, fits):
    # 1 MiB: 200,000 elements fit with sgd (0.8 MB) but not with adam (2.4 MB).
    store = Store(StoreConfig(mode="async", memory_budget_mb=1))
    keys = [Key("w", (200_000,), 0, 200_000)]
    if fits:
        assert store.init(keys, optimizer, {}).created
        return
    with pytest.raises(ResourceExhausted, match=r"memory budget of 1048576 bytes "
                                                r"\(--memory-budget-mb 1\)"):
        store.init(keys, optimizer, {})
    _good_init_works(store)


@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_that_is_no_budget_is_refused(budget):
    with pytest.raises(ValueError, match="memory_budget_mb must be > 0"):
        StoreConfig(memory_budget_mb=budget)


BAD_LAYOUTS = [
    ([Key("w", (10,), 0, 6), Key("w", (10,), 4, 10)], r"keys w\[0:6\] and w\[4:10\] overlap"),
    ([Key("w", (10,), 0, 10), Key("w", (10,), 2, 3)], r"keys w\[0:10\] and w\[2:3\] overlap"),
    ([Key("w", (10,), 5, 10), Key("v", (3,), 0, 3), Key("w", (10,), 0, 6)],
     r"keys w\[0:6\] and w\[5:10\] overlap"),
    ([Key("w", (10,), 0, 10), Key("w", (10,), 0, 10)], r"key w\[0:10\] appears twice"),
    ([Key("w", (10,), -1, 5)], r"key w\[-1:5\] is not a non-empty range of a tensor of shape "
                               r"\(10,\) \(10 elements\)"),
    ([Key("w", (10,), 0, 11)], r"w\[0:11\] is not a non-empty range"),
    ([Key("w", (10,), 5, 5)], r"w\[5:5\] is not a non-empty range"),
    ([Key("w", (10,), 6, 5)], r"w\[6:5\] is not a non-empty range"),
    ([Key("w", (-2, -5), 0, 10)], "has a negative dimension"),
    ([Key("w", (0,), 0, 1)], r"w\[0:1\] is not a non-empty range"),
    ([Key("w", (10,), 0, 5), Key("w", (2, 5), 5, 10)],
     r"keys w\[0:5\] and w\[5:10\] give tensor 'w' two shapes, \(10,\) and \(2, 5\)"),
    ([Key("", (3,), 0, 3)], "has no tensor name"),
    ([], "the layout has no keys"),
]


@pytest.mark.parametrize("keys, words", BAD_LAYOUTS, ids=lambda x: str(x)[:50])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_bad_layout_is_refused_naming_the_keys_and_keeps_nothing(keys, words, mode):
    store = Store(StoreConfig(mode=mode, workers=1))
    with pytest.raises(BadRequest, match=words):
        store.init(keys, SGD, {})
    _good_init_works(store)


def test_a_memory_error_while_allocating_keeps_no_layout(monkeypatch):
    store = Store(StoreConfig(mode="async"))

    def fail(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as patch:
        patch.setattr(Shard, "new", fail)
        with pytest.raises(ResourceExhausted, match="could not allocate the layout; nothing "
                                                    "was kept"):
            store.init(GOOD, ADAM, {})
    assert store.layout() == ()
    with monkeypatch.context() as patch:
        patch.setattr(Shard, "fill", fail)
        with pytest.raises(ResourceExhausted, match="could not allocate the values"):
            store.init(GOOD, ADAM, {k.id: np.ones(k.size, np.float32) for k in GOOD})
    _good_init_works(store)


def test_a_refused_value_in_the_first_init_keeps_no_layout():
    store = Store(StoreConfig(mode="async"))
    with pytest.raises(BadRequest, match="inf or NaN"):
        store.init(GOOD, SGD, {GOOD[0].id: np.full(12, np.inf, np.float32)})
    _good_init_works(store)
