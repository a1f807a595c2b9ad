"""Kernel speed: each Numba kernel against the NumPy code a user would otherwise write.

Run with `make bench`. Prints a table and writes benchmarks/results/kernels.json. The NumPy
baselines below are idiomatic NumPy (vectorised, in place where NumPy allows), not the
deliberately plain twins of the tests, so the ratios are fair to NumPy.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Comparison, compare, table  # noqa: E402

import kernels as K  # noqa: E402, N812  (K: short, reads like a namespace)

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
N = 1 << 22  # 4 Mi float32 = 16 MiB: larger than the caches, like a real layer's traffic


def _numpy_adam(p, g, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**step)
    denom += eps
    p -= (lr / (1 - b1**step)) * m / denom


def _numpy_momentum(p, g, buf, lr, mu):
    buf *= mu
    buf += g
    p -= lr * buf


def _numpy_softmax_xent(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, labels]))
    d = e / s
    d[rows, labels] -= 1
    d /= len(labels)
    return loss, d


def _numpy_bf16_round(x):
    bits = x.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    out = np.where(np.isnan(x), np.uint32(0x7FC00000), rounded).astype(np.uint32)
    return out.view(np.float32)


def _numpy_trimmed_mean(g, k):
    s = np.sort(g, axis=0)
    return s[k : g.shape[0] - k].mean(axis=0)


def kernel_comparisons() -> list[Comparison]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N, dtype=np.float32) * np.float32(100)
    bits16 = K.fp16_encode(x)
    p1, p2 = (rng.standard_normal(N // 4, dtype=np.float32) for _ in range(2))
    g = rng.standard_normal(N // 4, dtype=np.float32)
    m1, v1, m2, v2, b1, b2 = (np.zeros(N // 4, np.float32) for _ in range(6))
    logits = rng.standard_normal((256, 10), dtype=np.float32)
    labels = rng.integers(0, 10, 256)
    z = rng.standard_normal((256, 512), dtype=np.float32)
    bias = rng.standard_normal(512, dtype=np.float32)
    a = np.maximum(z, 0)
    grads = [rng.standard_normal(s, dtype=np.float32) for s in (N // 8, 512, N // 16, 10)]
    stacks = {w: rng.standard_normal((w, N // 4), dtype=np.float32) for w in (4, 8)}
    mat = rng.standard_normal((512, 512), dtype=np.float32)
    with np.errstate(over="ignore"):
        runs = [
            compare("round_to_fp16", ("kernel", lambda: K.round_to_fp16(x)),
                    ("x.astype(f16).astype(f32)",
                     lambda: x.astype(np.float16).astype(np.float32)), goal=5.0),
            compare("fp16_encode", ("kernel", lambda: K.fp16_encode(x)),
                    ("x.astype(f16).view(u16)", lambda: x.astype(np.float16).view(np.uint16))),
            compare("fp16_decode", ("kernel", lambda: K.fp16_decode(bits16)),
                    ("bits.view(f16).astype(f32)",
                     lambda: bits16.view(np.float16).astype(np.float32))),
            compare("round_to_bf16", ("kernel", lambda: K.round_to_bf16(x)),
                    ("uint32 bit trick in NumPy", lambda: _numpy_bf16_round(x))),
            compare("adam_update", ("kernel", lambda: K.adam_update(p1, g, m1, v1, 10, 1e-3)),
                    ("NumPy in-place expression",
                     lambda: _numpy_adam(p2, g, m2, v2, 10, 1e-3)), goal=3.0),
            compare("sgd_update (momentum)",
                    ("kernel", lambda: K.sgd_update(p1, g, 0.01, momentum=0.9, buf=b1)),
                    ("NumPy in-place expression", lambda: _numpy_momentum(p2, g, b2, 0.01, 0.9))),
            compare("softmax_cross_entropy (256x10)",
                    ("kernel", lambda: K.softmax_cross_entropy(logits, labels)),
                    ("NumPy log-sum-exp", lambda: _numpy_softmax_xent(logits, labels)),
                    goal=1.5),
            compare("bias_relu_forward (256x512)", ("kernel", lambda: K.bias_relu_forward(z, bias)),
                    ("np.maximum(z + b, 0)", lambda: np.maximum(z + bias, 0))),
            compare("relu_backward (256x512)", ("kernel", lambda: K.relu_backward(z, a)),
                    ("g * (a > 0)", lambda: z * (a > 0))),
            # Both read 8 rows of 1 Mi floats once: memory-bound, so parity is the ceiling; the
            # kernel's sums are float64 and correctly rounded, NumPy's float32.
            compare("aggregate_mean (W=8, f64 sums)",
                    ("kernel", lambda: K.aggregate_mean(stacks[8])),
                    ("g.mean(axis=0), f32 sums", lambda: stacks[8].mean(axis=0))),
        ]
        for w in (4, 8):
            runs.append(compare(
                f"aggregate_median (W={w})", ("kernel", lambda w=w: K.aggregate_median(stacks[w])),
                ("np.median(g, axis=0)", lambda w=w: np.median(stacks[w], axis=0)), goal=1.0))
        runs += [
            compare("aggregate_trimmed_mean (W=8, 25%)",
                    ("kernel", lambda: K.aggregate_trimmed_mean(stacks[8], 0.25)),
                    ("sort + mean", lambda: _numpy_trimmed_mean(stacks[8], 2))),
            # The kernel sums in float64 (~1e-13 relative), BLAS's sdot in float32 (~1e-6).
            compare("global_norm (4 arrays, f64 sums)", ("kernel", lambda: K.global_norm(grads)),
                    ("sqrt(sum(vdot)), f32 sums",
                     lambda: np.sqrt(sum(float(np.vdot(t, t)) for t in grads)))),
            compare("all_finite", ("kernel", lambda: K.all_finite(x)),
                    ("np.isfinite(x).all()", lambda: bool(np.isfinite(x).all()))),
            compare("blocked_matmul (512^3, teaching)",
                    ("Numba blocked", lambda: K.blocked_matmul(mat, mat)),
                    ("BLAS (NumPy @)", lambda: mat @ mat), rounds=7),
        ]
    return runs


_FIRST_CALL = (
    "import time, numpy as np; t = time.perf_counter(); import kernels; "
    "kernels.round_to_fp16(np.ones(8, np.float32)); kernels.adam_update("
    "np.ones(8, np.float32), np.ones(8, np.float32), np.zeros(8, np.float32), "
    "np.zeros(8, np.float32), 1, 1e-3); print(time.perf_counter() - t)"
)


def first_call_seconds() -> dict:
    """Import kernels and call two of them in a fresh process: empty cache, then warm cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        times = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True, timeout=300)
            times.append(float(out.stdout.strip()))
    return {"empty_cache_s": times[0], "warm_cache_s": times[1],
            "speedup": times[0] / times[1]}


def main() -> int:
    started = time.perf_counter()
    runs = kernel_comparisons()
    first = first_call_seconds()
    print(table("kernel", runs, baseline_column=True))
    print(f"first call in a fresh process: {first['empty_cache_s']:.2f} s with an empty Numba "
          f"cache, {first['warm_cache_s']:.2f} s warm ({first['speedup']:.1f}x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__},
        "elements": N,
        "kernels": [r.as_dict() for r in runs],
        "first_call": first,
        "bench_s": time.perf_counter() - started,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
