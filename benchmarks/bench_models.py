"""Model speed: one training step (loss_and_grads) of the models `--model` builds, on digits.

Run with `make bench`. Prints two tables and writes benchmarks/results/models.json:
- a step of each CNN against a step of the default MLP (mlp:128), batch 32: what a
  convolution costs on 8x8 images;
- a convolution's forward and backward as im2col + BLAS + col2im (what Conv2d does) against
  the same convolution as direct loops, compiled by Numba: why the layer unrolls its input.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# One BLAS thread, as the launcher gives a worker on a laptop: a CNN's products are small,
# and on busy cores OpenBLAS's threads wait on each other longer than they compute (a
# cnn:16,32 step measured 40 ms with 2 threads on 2 loaded cores, 1.2 ms with 1).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402  (after the thread settings, which BLAS reads once)
from numba import njit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Comparison, compare, table  # noqa: E402

from worker.data import load_dataset  # noqa: E402
from worker.layers import Conv2d  # noqa: E402
from worker.model_spec import build_model  # noqa: E402
from worker.precision import Precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
BATCH = 32
FP32 = Precision("fp32")


@njit(cache=True, nogil=True)
def _direct_conv(x, w, b, pad, out):
    """out[n, o, i, j] = b[o] + sum over c, di, dj of w[o, c, di, dj] x[n, c, i+di-pad, j+dj-pad]
    (stride 1): the definition as seven loops, no unrolling."""
    batch, channels, height, width = x.shape
    outs, _, k, _ = w.shape
    for n in range(batch):
        for o in range(outs):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    acc = b[o]
                    for c in range(channels):
                        for di in range(k):
                            h = i + di - pad
                            if h < 0 or h >= height:
                                continue
                            for dj in range(k):
                                v = j + dj - pad
                                if 0 <= v < width:
                                    acc += w[o, c, di, dj] * x[n, c, h, v]
                    out[n, o, i, j] = acc


@njit(cache=True, nogil=True)
def _direct_conv_backward(x, w, d, pad, dx, dw, db):
    """The gradients of _direct_conv, as loops: dx, dw, db (all start at zero)."""
    batch, channels, height, width = x.shape
    outs, _, k, _ = w.shape
    for n in range(batch):
        for o in range(outs):
            for i in range(d.shape[2]):
                for j in range(d.shape[3]):
                    g = d[n, o, i, j]
                    db[o] += g
                    for c in range(channels):
                        for di in range(k):
                            h = i + di - pad
                            if h < 0 or h >= height:
                                continue
                            for dj in range(k):
                                v = j + dj - pad
                                if 0 <= v < width:
                                    dw[o, c, di, dj] += g * x[n, c, h, v]
                                    dx[n, c, h, v] += g * w[o, c, di, dj]


def _direct(x, w, b, d):
    out = np.empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), np.float32)
    _direct_conv(x, w, b, 1, out)
    dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)
    _direct_conv_backward(x, w, d, 1, dx, dw, db)
    return out, dx, dw, db


def _layer(layer, params, x, d):
    y, cache = layer.forward(params, x, FP32, True)
    return y, *layer.backward(params, cache, d, True)


def step_comparisons() -> list[Comparison]:
    data = load_dataset("digits")
    X, y = data.X_train[:BATCH], data.y_train[:BATCH]
    mlp = build_model("mlp:128", data.n_features, data.image_shape, data.n_classes)
    mlp_params = mlp.init_params()
    runs = []
    for spec in ("cnn:8", "cnn:16,32", "cnn:16,32/64"):
        model = build_model(spec, data.n_features, data.image_shape, data.n_classes)
        params = model.init_params()
        runs.append(compare(
            f"{spec} step (batch {BATCH})",
            (spec, lambda m=model, p=params: m.loss_and_grads(p, X, y)),
            ("mlp:128", lambda: mlp.loss_and_grads(mlp_params, X, y))))
    return runs


def conv_comparisons() -> list[Comparison]:
    rng = np.random.default_rng(0)
    runs = []
    for channels, outs, size in ((1, 16, 8), (16, 32, 4), (8, 16, 28)):
        layer = Conv2d(channels, outs, 3, padding=1)
        x = rng.standard_normal((BATCH, channels, size, size), np.float32)
        params = layer.init(rng)
        d = rng.standard_normal((BATCH, outs, size, size), np.float32)
        y, dx, grads = _layer(layer, params, x, d)
        want = _direct(x, params["weight"], params["bias"], d)
        for got, ref in zip((y, dx, grads["weight"], grads["bias"]), want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)  # same maths
        runs.append(compare(
            f"conv {channels}->{outs} {size}x{size} fwd+bwd",
            ("im2col + BLAS", lambda ly=layer, p=params, x=x, d=d: _layer(ly, p, x, d)),
            ("direct loops (Numba)",
             lambda p=params, x=x, d=d: _direct(x, p["weight"], p["bias"], d))))
    return runs


def main() -> int:
    started = time.perf_counter()
    steps = step_comparisons()
    convs = conv_comparisons()
    print(table("model step, vs the MLP", steps))
    for run in steps:
        print(f"  {run.ours}: {run.ours_s * 1e3:.2f} ms per step "
              f"({BATCH / run.ours_s:,.0f} samples/s); mlp:128 {run.baseline_s * 1e3:.2f} ms")
    print(table("convolution, vs direct loops", convs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__},
        "batch": BATCH,
        "steps": [r.as_dict() for r in steps],
        "convolutions": [r.as_dict() for r in convs],
        "bench_s": time.perf_counter() - started,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
