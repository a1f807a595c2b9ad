"""Sync mode: W workers of batch b give the weights of one process doing SGD with batch W*b.

Real gRPC servers (in this process), one PSClient per worker thread, a tensor split across
servers and cut into several keys, compared with the single-process trainer's arithmetic.
"""

import threading

import numpy as np
import pytest
from cluster import assert_close

from ps.client import PSClient
from ps.optimizer import Optimizer, OptimizerConfig
from ps.server import serve
from worker.loop import WorkerConfig, run_worker
from worker.model import MLP
from worker.shards import Shard

SIZES = (20, 24, 5)
STEPS, BATCH = 24, 8


def _data(workers):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((workers * STEPS * BATCH, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], len(X))
    return X, y


def _shards(X, y, workers):
    per = len(X) // workers
    return [Shard(X[w * per:(w + 1) * per], y[w * per:(w + 1) * per],
                  np.arange(w * per, (w + 1) * per)) for w in range(workers)]


def _single_process(model, shards, config):
    """One process, batch W*b: step t uses every worker's batch t, in worker order, at the
    schedule's lr of update t (as worker/baseline.py steps it)."""
    params = model.init_params()
    opt = Optimizer(config, model.param_shapes())
    for t in range(STEPS):
        X = np.concatenate([s.X[t * BATCH:(t + 1) * BATCH] for s in shards])
        y = np.concatenate([s.y[t * BATCH:(t + 1) * BATCH] for s in shards])
        _, grads = model.loss_and_grads(params, X, y)
        for name, grad in grads.items():
            opt.step(name, params[name], grad, lr=config.lr_at(t))
    return params


@pytest.mark.parametrize(
    ("workers", "servers", "optimizer", "settings", "fused"),
    [
        (2, 1, "sgd", {"lr": 0.1}, True),
        (2, 2, "sgd", {"lr": 0.1}, False),
        (3, 1, "sgd", {"lr": 0.1}, False),
        (3, 2, "sgd", {"lr": 0.1}, True),
        (3, 2, "momentum", {"lr": 0.05, "momentum": 0.9}, True),
        (2, 2, "adam", {"lr": 0.01}, False),
        (2, 1, "adamw", {"lr": 0.01, "weight_decay": 0.1}, True),
        # a schedule, its T_MAX the run's steps: each server's keys count their own updates
        (2, 2, "momentum", {"lr": 0.1, "lr_schedule": "warmup:4,cosine",
                            "planned_steps": STEPS}, True),
    ],
)
def test_sync_workers_equal_one_process_with_the_whole_batch(workers, servers, optimizer,
                                                             settings, fused):
    model = MLP(SIZES, seed=3)
    shards = _shards(*_data(workers), workers)
    running = [serve(mode="sync", workers=workers) for _ in range(servers)]
    addresses = [r.address for r in running]
    errors = []

    def work(w):
        try:
            # 1 KiB chunks: dense0.weight (1,920 B) is split across servers and cut into keys.
            with PSClient(addresses, worker_id=w, chunk_bytes=1024, deadline_s=30) as client:
                client.init(model.init_params(), optimizer, split_bytes=1000, **settings)
                run_worker(client, model, shards[w],
                           WorkerConfig(steps=STEPS, batch_size=BATCH, shuffle=False,
                                        fused=fused))
        except Exception as err:  # reported below: a thread cannot fail the test itself
            errors.append(err)

    try:
        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads), "a worker did not finish"
        with PSClient(addresses) as client:
            got = client.pull()
            stats = client.stats()
    finally:
        for r in running:
            r.stop(0)
    if servers > 1:
        assert sum(s["keys"] for s in stats) > len(got)  # split and cut: more keys than tensors
    assert all(s["min_version"] == STEPS for s in stats)
    want = _single_process(model, shards, OptimizerConfig(optimizer, **settings))
    assert_close(got, want, rtol=1e-5)
    moved = np.linalg.norm(want["dense0.weight"] - model.init_params()["dense0.weight"])
    assert moved > 0.1  # the comparison is about weights that really trained
