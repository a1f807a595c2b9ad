"""Placement: every strategy covers every parameter exactly once, and says so in its table."""

import math

import numpy as np
import pytest

from ps.keys import cut
from ps.placement import TensorSpec, place
from worker.model import MLP

SPECS = [TensorSpec(n, s) for n, s in MLP((64, 128, 64, 10)).param_shapes().items()]


def _coverage(placement):
    """Count how often each flat element of each tensor is held by some part."""
    seen = {s.name: np.zeros(math.prod(s.shape), int) for s in SPECS}
    for part in placement.parts:
        start, stop = part.elements
        seen[part.name][start:stop] += 1
    return seen


@pytest.mark.parametrize("servers", [1, 2, 3, 5])
@pytest.mark.parametrize("strategy", ["round_robin", "size_balanced"])
@pytest.mark.parametrize("split_bytes", [None, 4096])
def test_every_parameter_is_held_exactly_once(servers, strategy, split_bytes):
    placement = place(SPECS, servers, strategy, split_bytes)
    for name, counts in _coverage(placement).items():
        assert np.all(counts == 1), name
    assert all(0 <= p.server < servers for p in placement.parts)


def test_round_robin_goes_in_model_order():
    placement = place(SPECS, 2, "round_robin")
    assert [p.server for p in placement.parts] == [0, 1, 0, 1, 0, 1]


def test_size_balanced_puts_the_largest_first_on_the_least_loaded():
    placement = place(SPECS, 2, "size_balanced")
    by_name = {p.name: p.server for p in placement.parts}
    # dense0.weight (32 KiB) and dense1.weight (32 KiB) are the two largest: one per server.
    assert by_name["dense0.weight"] != by_name["dense1.weight"]
    loads = placement.bytes_per_server()
    assert max(loads) - min(loads) <= max(s.nbytes for s in SPECS)


def test_explicit_placement_puts_each_layer_where_told():
    placement = place(SPECS, 3, "dense0=2,dense1=0,dense2=1")
    assert {p.name: p.server for p in placement.parts} == {
        "dense0.weight": 2, "dense0.bias": 2, "dense1.weight": 0, "dense1.bias": 0,
        "dense2.weight": 1, "dense2.bias": 1,
    }


def test_a_tensor_above_the_threshold_is_split_into_row_ranges():
    placement = place(SPECS, 3, "round_robin", split_bytes=20_000)
    parts = placement.parts_of("dense0.weight")  # 64 x 128 float32 = 32 KiB
    assert [(p.server, p.rows) for p in parts] == [(0, (0, 21)), (1, (21, 43)), (2, (43, 64))]
    summary = placement.as_summary()
    assert summary["dense0.weight"] == [{"server": 0, "rows": [0, 21]},
                                        {"server": 1, "rows": [21, 43]},
                                        {"server": 2, "rows": [43, 64]}]
    assert isinstance(summary["dense0.bias"], int)


def test_bytes_per_server_match_the_table():
    placement = place(SPECS, 2, "size_balanced", split_bytes=20_000)
    table = placement.table()
    for server, total in enumerate(placement.bytes_per_server()):
        assert f"server {server}: {total:,} B" in table
    listed = {s: 0 for s in range(2)}
    for line in table.splitlines()[2:-1]:
        cells = line.split()
        listed[int(cells[3])] += int(cells[2].replace(",", ""))
    assert listed == dict(enumerate(placement.bytes_per_server()))
    assert sum(listed.values()) == sum(s.nbytes for s in SPECS)


def test_placement_is_a_pure_function():
    assert place(SPECS, 3, "size_balanced", 4096) == place(SPECS, 3, "size_balanced", 4096)


@pytest.mark.parametrize(
    ("strategy", "servers", "message"),
    [
        ("dense0=3,dense1=0,dense2=1", 3, "server 3 for 'dense0' is out of range"),
        ("dense0=0,dense9=1,dense1=0,dense2=0", 2, "unknown layer 'dense9'"),
        ("dense0=0,dense1=1", 2, "no server given for dense2"),
        ("dense0=0,dense0=1,dense1=0,dense2=0", 2, "given twice"),
        ("dense0:1", 2, "expected LAYER=SERVER"),
    ],
)
def test_bad_explicit_placements_are_refused(strategy, servers, message):
    with pytest.raises(ValueError, match=message):
        place(SPECS, servers, strategy)


def test_zero_servers_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="servers must be >= 1"):
        place(SPECS, 0)
    with pytest.raises(ValueError, match="unique"):
        place(SPECS + SPECS[:1], 2)


def test_keys_cut_parts_into_chunks_that_cover_them():
    placement = place(SPECS, 2, "round_robin", split_bytes=20_000)
    keys = cut(placement, chunk_bytes=4000)  # 1000 floats a key
    assert all(k.size <= 1000 for ks in keys.values() for k in ks)
    for part in placement.parts:
        mine = sorted((k.start, k.stop) for k in keys[part.server] if k.name == part.name
                      and part.elements[0] <= k.start < part.elements[1])
        assert mine[0][0] == part.elements[0] and mine[-1][1] == part.elements[1]
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:], strict=False))
