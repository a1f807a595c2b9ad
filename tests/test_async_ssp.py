"""async and ssp with real processes: one server process, worker processes (spawn), digits."""

import time

import pytest
from cluster import end_process, run_worker_processes, spawn_server

from ps.client import PSClient
from worker.data import load_dataset
from worker.model import MLP

HIDDEN = (64,)


def _specs(addresses, workers, steps, lr, origin=None, delays=None):
    delays = delays or {}
    return [
        {"dataset": "digits", "seed": 0, "workers": workers, "worker": w,
         "addresses": addresses, "hidden": HIDDEN, "lr": lr, "origin": origin,
         "config": {"steps": steps, "batch_size": 32, "seed": 0,
                    "delay_s": delays.get(w, 0.0)}}
        for w in range(workers)
    ]


@pytest.fixture
def server_process(request):
    procs = []

    def start(**kwargs):
        proc, address = spawn_server(**kwargs)
        procs.append(proc)
        return address

    yield start
    for proc in procs:
        end_process(proc)


def test_async_workers_see_staleness_and_still_converge(server_process):
    address = server_process(mode="async", workers=2)
    records = run_worker_processes(_specs([address], 2, steps=150, lr=0.05))
    with PSClient([address]) as client:
        params = client.pull()
        stats = client.stats()[0]
    data = load_dataset("digits", seed=0)
    _, accuracy = MLP((64, *HIDDEN, 10), seed=0).evaluate(params, data.X_test, data.y_test)
    assert stats["updates"] == 2 * 150 * 4  # every push applied, to each of the 4 tensors
    assert stats["staleness_max"] > 0 and stats["staleness_sum"] > 0
    assert any(r["staleness"] > 0 for rs in records.values() for r in rs)
    assert accuracy >= 0.9


def test_ssp_keeps_every_worker_within_k_clocks_of_the_slowest(server_process):
    workers, bound, steps = 3, 2, 30
    address = server_process(mode="ssp", workers=workers, staleness=bound)
    origin = time.monotonic()  # the system-wide clock: comparable across processes
    records = run_worker_processes(
        _specs([address], workers, steps, lr=0.05, origin=origin, delays={2: 0.02}))
    with PSClient([address]) as client:
        stats = client.stats()[0]
    # When worker w began step c (its pull returned), the servers had counted at most the
    # pushes that other workers had begun by then; SSP demands at least c - K of them.
    for w, mine in records.items():
        for rec in mine:
            for u, theirs in records.items():
                begun = sum(1 for r in theirs if r["pushing"] < rec["pulled"])
                assert rec["step"] - begun <= bound, (w, rec["step"], u, begun)
    # An applied gradient missed at most 2K+1 steps of each other worker.
    assert stats["staleness_max"] <= (workers - 1) * (2 * bound + 1)
    # The bound did bind: the fast workers spent most of their time waiting for the slow one
    # (step 0 left out: it loads the compiled kernels).
    for w in (0, 1):
        waited = sum(r["wait_s"] for r in records[w][1:])
        computed = sum(r["compute_s"] for r in records[w][1:])
        assert waited > computed
