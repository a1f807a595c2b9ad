"""summary.json: what a run did, from the workers' step records and the servers' counters.

Every figure is computed from what was recorded (nothing is estimated): staleness from the
servers' histograms of applied gradients, waiting from the workers' own clocks, bytes from
the servers' counters.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ps.placement import Placement
from tinyps.config import LaunchConfig

__all__ = ["build_summary", "format_summary", "staleness_limit", "time_split"]

# final_train_loss: the mean of each worker's last steps, so that one noisy batch does not
# decide it.
_LAST_STEPS = 10


def build_summary(
    config: LaunchConfig,
    records: list[dict],
    stats: list[dict],
    test_loss: float | None,
    test_accuracy: float | None,
    placement: Placement,
    wall_s: float,
    steps_per_worker: int,
    n_train: int,
    faults: dict | None = None,
) -> dict:
    per_worker: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        per_worker[r["worker"]].append(r)
    hist: list[int] = []
    for s in stats:
        for staleness, count in enumerate(s["staleness_histogram"]):
            hist.extend([0] * (staleness + 1 - len(hist)))
            hist[staleness] += count
    applied = sum(hist)
    train_start = min((r["pulled"] for r in records), default=0.0)
    train_end = max((r["time"] for r in records), default=0.0)
    last_losses = [r["loss"] for rs in per_worker.values()
                   for r in sorted(rs, key=lambda r: r["step"])[-_LAST_STEPS:]]
    wait_fraction = []
    for w in range(config.workers):
        waited = sum(r["wait_s"] for r in per_worker.get(w, []))
        computed = sum(r["compute_s"] for r in per_worker.get(w, []))
        wait_fraction.append(waited / (waited + computed) if waited + computed else 0.0)
    faults = faults or {}
    diverged = _diverged(test_loss, per_worker)
    return {
        "mode": config.mode,
        "servers": config.servers,
        "workers": config.workers,
        "staleness_bound": config.staleness_bound,
        "precision": config.precision.precision,
        "dataset": config.train.dataset,
        "optimizer": config.train.optimizer,
        "lr": config.train.lr,
        "lr_schedule": config.train.lr_schedule,  # None: lr at every update
        # Passes over the training set: as configured, or what --steps amounted to.
        "epochs": (config.train.epochs if config.train.steps is None else
                   round(steps_per_worker * config.workers * config.train.batch_size / n_train, 2)),
        "steps_per_worker": steps_per_worker,
        "batch_size": config.train.batch_size,  # per worker
        "wall_s": wall_s,
        "train_s": train_end - train_start,
        "samples_per_s": (sum(r["samples"] for r in records) / (train_end - train_start)
                          if train_end > train_start else 0.0),
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "final_train_loss": sum(last_losses) / len(last_losses) if last_losses else None,
        "staleness_mean": sum(s * n for s, n in enumerate(hist)) / applied if applied else 0.0,
        "staleness_max": max((s for s, n in enumerate(hist) if n), default=0),
        "staleness_histogram": hist,  # one count per key an applied gradient updated
        # The most a gradient can have missed, as the mode guarantees: sync none; ssp(K) at
        # most 2K+1 updates by each other worker (docs/architecture.md); async no bound.
        "staleness_limit": staleness_limit(config.mode, config.staleness_bound,
                                           config.workers),
        "wait_fraction": wait_fraction,
        # Per worker: seconds computing, on the wire, blocked at barriers and evaluating, and
        # their shares of the worker's time (time_split).
        "time_split": [time_split(w, per_worker.get(w, [])) for w in range(config.workers)],
        "dropped_stale": sum(s["dropped_stale"] for s in stats),
        "rejected_pushes": sum(s["rejected_pushes"] for s in stats),
        # An update of the model = one optimizer step of every key; the busiest key counts it.
        "updates_applied": max((s["max_version"] for s in stats), default=0),
        "bytes_pushed": sum(s["bytes_in"] for s in stats),
        "bytes_pulled": sum(s["bytes_out"] for s in stats),
        # Faults and recovery: processes restarted by the launcher, checkpoints the servers
        # wrote, sync gradients dropped as late (backup workers; the server that dropped the
        # most: each server decides for its own keys), workers given up on.
        "restarts": faults.get("restarts", 0),
        "checkpoints_written": faults.get("checkpoints_written", 0),
        "dropped_gradients": max((s["dropped_gradients"] for s in stats), default=0),
        "workers_lost": faults.get("workers_lost", []),
        "fault_events": faults.get("fault_events", []),
        "aggregate": config.store.aggregate,
        "backup_workers": config.store.backup_workers,
        "byzantine_workers": config.faults.byzantine,
        "diverged": diverged is not None,
        "diverged_reason": diverged,
        # sync: workers whose gradients stood apart (flagged by any server; ps/watch.py),
        # and what the servers saw of each worker, weighted by the parameters they hold.
        "suspect_workers": sorted({w for s in stats for w in s.get("suspect_workers", [])}),
        "grad_cosine": _per_worker(stats, "grad_cosine"),
        "grad_norm_ratio": _per_worker(stats, "grad_norm_ratio"),
        # Mixed precision: the scale at the end (worker 0's), the steps skipped for inf/NaN
        # gradients, and the share of non-zero fp32 gradient values that became 0 in 16 bits.
        "loss_scale": config.precision.loss_scale,  # as asked: none, dynamic or a number
        "loss_scale_final": (sorted(per_worker[0], key=lambda r: r["step"])[-1]["loss_scale"]
                             if per_worker.get(0) else None),
        "skipped_steps": max((s["skipped_steps"] for s in stats), default=0),
        "grad_underflow_fraction": (
            sum(r["grad_underflow"] for r in records) / nonzero
            if (nonzero := sum(r["grad_nonzero"] for r in records)) else 0.0),
        "per_server": [
            {"index": s["index"], "address": s["address"], "tensors": s["tensors"],
             "params": s["params"], "bytes_in": s["bytes_in"], "bytes_out": s["bytes_out"],
             "updates": s["max_version"]}
            for s in stats
        ],
        "placement": placement.as_summary(),
    }


def time_split(worker: int, records: list[dict]) -> dict:
    """Where one worker's time went: compute, wire and blocked seconds (the wait split by
    what the servers measured; records of an older tinyps count all of it as wire), held-out
    evaluation, and each one's share of their sum."""
    seconds = {"compute_s": 0.0, "wire_s": 0.0, "blocked_s": 0.0, "eval_s": 0.0}
    for r in records:
        blocked = r.get("blocked_s", 0.0)
        seconds["compute_s"] += r["compute_s"]
        seconds["blocked_s"] += blocked
        seconds["wire_s"] += r.get("wire_s", r["wait_s"] - blocked)
        seconds["eval_s"] += r.get("eval_s") or 0.0
    total = sum(seconds.values())
    shares = {name[:-2] + "_share": value / total if total else 0.0
              for name, value in seconds.items()}
    return {"worker": worker, **seconds, **shares}


def staleness_limit(mode: str, bound: int | None, workers: int) -> int | None:
    """The largest staleness the mode allows: 0 in sync, (W-1)(2K+1) in ssp(K), None (no
    bound) in async."""
    if mode == "sync":
        return 0
    if mode == "ssp":
        return (workers - 1) * (2 * (bound or 0) + 1)
    return None


def _staleness_line(summary: dict) -> str:
    limit = summary.get("staleness_limit")
    text = f"staleness mean {summary['staleness_mean']:.2f}, max {summary['staleness_max']}"
    if summary["mode"] == "ssp" and limit is not None:
        k, others = summary["staleness_bound"], summary["workers"] - 1
        text += (f" (ssp K={k} allows {limit}: up to 2K+1 = {2 * k + 1} updates by each of the "
                 f"{others} other workers)")
    elif summary["mode"] == "async":
        text += " (async: no bound)"
    return text


def _features_line(summary: dict) -> str | None:
    """The features a run turned on, echoed so that its output shows what it shows."""
    parts = []
    if summary.get("precision", "fp32") != "fp32":
        scale = summary.get("loss_scale")
        final = summary.get("loss_scale_final")
        parts.append(f"precision {summary['precision']} with fp32 master weights, loss scale "
                     f"{scale}" + (f" (final {final:g})" if scale == "dynamic" and final
                                   else "")
                     + f", {summary.get('skipped_steps', 0)} steps skipped for inf/NaN, "
                       f"{summary.get('grad_underflow_fraction', 0.0):.2%} of gradient values "
                       f"underflowed to 0")
    if summary.get("aggregate", "mean") != "mean":
        parts.append(f"aggregate {summary['aggregate']}")
    if summary.get("backup_workers"):
        parts.append(f"{summary['backup_workers']} backup workers: "
                     f"{summary['dropped_gradients']} late gradients dropped")
    elif summary.get("dropped_gradients"):
        parts.append(f"{summary['dropped_gradients']} late gradients dropped")
    return "; ".join(parts) if parts else None


def _per_worker(stats: list[dict], key: str) -> dict[int, float]:
    totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s in stats:
        for w, value in s.get(key, {}).items():
            totals[w][0] += s["params"] * value
            totals[w][1] += s["params"]
    return {w: v / n for w, (v, n) in sorted(totals.items()) if n}


def _diverged(test_loss: float | None, per_worker: dict[int, list[dict]]) -> str | None:
    """Why the model diverged, or None if it did not. Diverged means one of: the final
    model's test loss is not finite; a worker's training loss was not finite in one of its
    last 10 steps (a passing overflow earlier, skipped by loss scaling, is not); the mean of
    the workers' last 10 losses is above the mean of their first 10 (it got worse instead of
    better). The run still finishes, and says so."""
    if test_loss is not None and not math.isfinite(test_loss):
        return f"the final model's test loss is {test_loss}"
    firsts, lasts = [], []
    for w, rs in sorted(per_worker.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        bad = next((r for r in rs[-_LAST_STEPS:] if not math.isfinite(r["loss"])), None)
        if bad is not None:
            return f"worker{w}'s training loss was {bad['loss']} at step {bad['step']}"
        firsts += [r["loss"] for r in rs[:_LAST_STEPS]]
        lasts += [r["loss"] for r in rs[-_LAST_STEPS:]]
    if not firsts:
        return None
    first, last = sum(firsts) / len(firsts), sum(lasts) / len(lasts)
    if last > first:
        return (f"the training loss grew from {first:.4f} (mean of the first {_LAST_STEPS} "
                f"steps) to {last:.4f} (the last {_LAST_STEPS})")
    return None


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _split_lines(split: list[dict]) -> list[str]:
    """Each worker's time as compute / wire / blocked (/ eval) shares, one line in all."""
    if not split:
        return []
    parts = []
    for s in split:
        text = (f"worker{s['worker']} {s['compute_share']:.0%} / {s['wire_share']:.0%} / "
                f"{s['blocked_share']:.0%}")
        if s["eval_s"]:
            text += f" (+{s['eval_share']:.0%} eval)"
        parts.append(text)
    return ["time compute / wire / blocked at barriers: " + ", ".join(parts)]


def format_summary(summary: dict, run_dir) -> str:
    """The summary as a few lines for a terminal."""
    bound = summary["staleness_bound"]
    mode = summary["mode"] + ("" if bound in (None, 0) else f" (K={bound})")
    waits = ", ".join(f"{w:.0%}" for w in summary["wait_fraction"])
    resumed = summary.get("resumed_from")
    this_launch = summary.get("steps_this_launch", summary["steps_per_worker"])
    return "\n".join([
        f"{mode}: {summary['servers']} servers, {summary['workers']} workers, "
        f"{summary['steps_per_worker']} steps each, {summary['dataset']}",
        *([f"resumed from {resumed['run']} at step {resumed['step']}: {this_launch} steps "
           f"each in this launch"] if resumed else []),
        *([f"resume: {note}" for note in summary.get("resume_notes", [])]),
        *([f"INTERRUPTED after {summary.get('steps_done', 0)} of {this_launch} x "
           f"{summary['workers']} steps: {'; '.join(summary.get('interrupt_notes', []))}"]
          if summary.get("interrupted") else []),
        f"test accuracy {_figure(summary['test_accuracy'], '.2%')}, test loss "
        f"{_figure(summary['test_loss'], '.4f')}, final train loss "
        f"{_figure(summary['final_train_loss'], '.4f')}",
        f"{summary['samples_per_s']:,.0f} samples/s over {summary['train_s']:.1f} s of "
        f"training ({summary['wall_s']:.1f} s in all); time waiting on servers: {waits}",
        *_split_lines(summary.get("time_split", [])),
        *([line] if (line := _features_line(summary)) else []),
        f"{_staleness_line(summary)}; {summary['updates_applied']} updates; "
        f"{summary['bytes_pushed'] / 2**20:.1f} MiB pushed, "
        f"{summary['bytes_pulled'] / 2**20:.1f} MiB pulled",
        *([f"faults: {'; '.join(summary['fault_events'])}"] if summary["fault_events"]
          else []),
        *([f"the model DIVERGED: {summary.get('diverged_reason') or 'its loss grew'}"]
          if summary["diverged"] else []),
        *([f"suspect workers (gradients unlike the others'): {summary['suspect_workers']}"]
          if summary["suspect_workers"] else []),
        *([f"DP-SGD: epsilon {summary['dp_epsilon']:.3f} at delta {summary['dp_delta']:g} "
           f"(sigma {summary['dp_noise']:.3f}, clip {summary['dp_clip']:g}, sampling rate "
           f"{summary['sample_rate']:.4f}, noise on the {summary['dp_noise_at']}s)"]
          if "dp_epsilon" in summary else []),
        f"run directory: {run_dir}",
    ])
