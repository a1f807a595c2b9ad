"""DP-SGD's costs, side by side in one run.

- per-example gradient norms of a dense layer: the outer-product kernel (|a_i| |d_i|, no
  (batch, in, out) tensor) against the naive loop that builds each example's gradient
  (goal: >= 20x at batch 64);
- a worker step with per-example clipping (MLP.clipped_grad_sum) against a plain step
  (MLP.loss_and_grads): what privacy costs in compute.

Run with `make bench`; writes benchmarks/results/privacy.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, table  # noqa: E402

from kernels import outer_sq_norms  # noqa: E402
from worker.model import MLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "privacy.json"
BATCH = 64


def naive_sq_norms(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Each example's gradient built, then measured: what a framework without the trick does."""
    return np.array([np.sum(np.square(np.outer(a[i], d[i]))) for i in range(a.shape[0])])


def main() -> int:
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    runs = []
    for n_in, n_out in ((784, 256), (64, 128)):
        a = rng.standard_normal((BATCH, n_in), dtype=np.float32)
        d = rng.standard_normal((BATCH, n_out), dtype=np.float32)
        runs.append(compare(f"per-example norms, dense {n_in}x{n_out}, batch {BATCH}",
                            ("outer_sq_norms", lambda a=a, d=d: outer_sq_norms(a, d)),
                            ("naive loop", lambda a=a, d=d: naive_sq_norms(a, d)), goal=20.0))
    for sizes in ((64, 128, 10), (784, 256, 128, 10)):
        model = MLP(sizes, seed=0)
        params = model.init_params()
        X = rng.standard_normal((BATCH, sizes[0]), dtype=np.float32)
        y = rng.integers(0, sizes[-1], BATCH)
        runs.append(compare(
            f"worker step {'-'.join(map(str, sizes))}, batch {BATCH}: clipped vs plain",
            ("per-example clipping",
             lambda m=model, p=params, X=X, y=y: m.clipped_grad_sum(p, X, y, 1.0)),
            ("plain", lambda m=model, p=params, X=X, y=y: m.loss_and_grads(p, X, y))))
    print(table("privacy", runs))
    print("speedup = baseline time / ours; for the worker step, a speedup below 1 is what "
          "per-example clipping costs (0.5x: the step takes twice as long)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": [r.as_dict() for r in runs],
                                   "bench_s": time.perf_counter() - started}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
