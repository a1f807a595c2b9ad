"""Cluster throughput: samples/s for W = 1, 2, 4 workers in each mode, and where a worker's
step goes (compute, pull, push), from real `tinyps launch` runs in one sitting.

Run with `make bench`. Prints a table and writes benchmarks/results/cluster.json. Scaling is
reported as a ratio to W = 1 of the same mode, measured in the same run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import tinyps

RESULTS = Path(__file__).resolve().parent / "results" / "cluster.json"
WORKLOAD = {"dataset": "digits", "hidden": (256, 128), "batch_size": 64, "steps": 200,
            "servers": 1, "seed": 0}
MODES = {"sync": {"mode": "sync"}, "async": {"mode": "async"},
         "ssp(K=2)": {"mode": "ssp", "staleness": 2}}


def _shares(run_dir: Path) -> dict[str, float]:
    """Mean share of a worker's step in compute, pull and push (step 0 left out)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    records = [r for r in records if r["step"] > 0]
    totals = {k: sum(r[k] for r in records) for k in ("compute_s", "pull_s", "push_s")}
    whole = sum(totals.values())
    return {k.removesuffix("_s"): v / whole for k, v in totals.items()}


def measure(fused: bool = True) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode in MODES.items():
            for workers in (1, 2, 4):
                run_dir = Path(tmp) / f"{label}-{workers}"
                summary, _ = tinyps.launch(workers=workers, fused=fused, run_dir=str(run_dir),
                                           **WORKLOAD, **mode)
                rows.append({"mode": label, "workers": workers, "fused": fused,
                             "samples_per_s": summary["samples_per_s"],
                             "test_accuracy": summary["test_accuracy"],
                             "share": _shares(run_dir)})
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["workers"] == 1)
        row["vs_one_worker"] = row["samples_per_s"] / base["samples_per_s"]
    return rows


def main() -> int:
    started = time.perf_counter()
    rows = measure(fused=True) + measure(fused=False)
    print(f"{'mode':<9} {'W':>2} {'round trips':<12} {'samples/s':>10} {'vs W=1':>7}  "
          f"{'compute':>7} {'pull':>6} {'push':>6}")
    for r in rows:
        s = r["share"]
        print(f"{r['mode']:<9} {r['workers']:>2} {'PushPull' if r['fused'] else 'pull, push':<12} "
              f"{r['samples_per_s']:>10,.0f} {r['vs_one_worker']:>6.2f}x  "
              f"{s['compute']:>7.0%} {s['pull']:>6.0%} {s['push']:>6.0%}")
    print("shares: of a worker's step time (steps 1..); with PushPull the pull rides in the push")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"workload": WORKLOAD, "runs": rows,
                                   "bench_s": time.perf_counter() - started}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
