"""report.png: five plots that show what a run did, drawn from metrics.jsonl and summary.json.

Loss over time per worker, and beside it the held-out accuracy and loss as training went; the
staleness histogram of applied gradients; each worker's time split into compute, wire,
blocked at barriers and evaluation; and bytes and updates per server (how load was spread).
Also the picture of a data-quality report: each worker's shard, stacked by class.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tinyps.summary import time_split
from worker.quality import QualityReport

__all__ = ["plot_shards", "write_report"]


def write_report(records: list[dict], summary: dict, path: Path) -> Path:
    """Draw the report of a run into `path` (PNG) and return the path."""
    draw_report(records, summary).savefig(path, dpi=90)
    return path


def draw_report(records: list[dict], summary: dict):
    """The report of a run as a matplotlib Figure."""
    # A Figure of its own, not pyplot's: files only, and the process's backend (a
    # notebook's inline plots) stays as it was.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    per_worker: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        per_worker[r["worker"]].append(r)
    fig = Figure(figsize=(15, 8))
    grid = fig.add_gridspec(2, 6)  # two wide plots above, three below
    # Made in the order of the old 2x2 report (fig.axes[i] stays the plot it was), the
    # held-out plot last.
    loss_ax, staleness_ax, split_ax, traffic_ax = (
        fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[1, :2]),
        fig.add_subplot(grid[1, 2:4]), fig.add_subplot(grid[1, 4:]))
    held_out_ax = fig.add_subplot(grid[0, 3:], sharex=loss_ax)
    bound = summary["staleness_bound"]
    title = (f"{summary['mode']}{'' if bound in (None, 0) else f' (K={bound})'}: "
             f"{summary['servers']} servers, {summary['workers']} workers, "
             f"test accuracy {summary['test_accuracy']:.1%}")
    fig.suptitle(title)

    ax = loss_ax
    # The first step starts seconds after the launch (processes, data, compiled kernels):
    # shade that time, so that the axis starting at 0 does not look like a slow first step.
    started = min((r["pulled"] for r in records), default=0.0)
    if started > 0:
        ax.axvspan(0, started, color="0.9", label=f"start-up ({started:.1f} s)")
    ax.set_xlim(left=0)
    for w in sorted(per_worker):
        rs = sorted(per_worker[w], key=lambda r: r["step"])
        ax.plot([r["time"] for r in rs], [r["loss"] for r in rs], lw=0.8, label=f"worker {w}")
    ax.set(xlabel="seconds since start", ylabel="training loss (batch)", yscale="log",
           title="loss over time")
    ax.legend(fontsize=8)
    _held_out(held_out_ax, records, started)

    ax = staleness_ax
    hist = summary["staleness_histogram"]
    limit = summary.get("staleness_limit")
    ax.bar(range(len(hist)), hist, width=0.8, color="tab:orange")
    right = max(len(hist), 4, (limit or 0) + 2) - 0.4
    ax.set_xlim(-0.6, right)
    if limit is not None and summary["mode"] == "ssp":
        # What ssp(K) guarantees, beside what happened: 2K+1 updates of each other worker.
        ax.axvline(limit, color="k", ls="--", lw=1,
                   label=f"bound (W-1)(2K+1) = {limit}")
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # The servers count staleness per key: a gradient that updates four keys counts four
    # times, so the bars count key updates, not gradients.
    title = f"staleness: mean {summary['staleness_mean']:.2f}, max {summary['staleness_max']}"
    if limit is not None and summary["mode"] == "ssp":
        title += f" (bound {limit})"
    ax.set(xlabel="staleness (updates missed)", ylabel="key updates (one per key a gradient "
           "updated)", title=title)

    _time_split(split_ax, summary.get("time_split")
                or [time_split(w, per_worker[w]) for w in sorted(per_worker)])

    ax = traffic_ax
    servers = [s["index"] for s in summary["per_server"]]
    mib_in = [s["bytes_in"] / 2**20 for s in summary["per_server"]]
    mib_out = [s["bytes_out"] / 2**20 for s in summary["per_server"]]
    width = 0.4
    ax.bar([i - width / 2 for i in servers], mib_in, width, label="pushed to (MiB)")
    ax.bar([i + width / 2 for i in servers], mib_out, width, label="pulled from (MiB)")
    ax.set(xlabel="server", ylabel="MiB", title="traffic and updates per server",
           xticks=servers)
    twin = ax.twinx()
    twin.plot(servers, [s["updates"] for s in summary["per_server"]], "ko-", label="updates")
    twin.set_ylabel("updates applied")
    twin.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower left")

    fig.tight_layout()
    return fig


def _held_out(ax, records: list[dict], started: float) -> None:
    """Held-out accuracy (left axis) and loss (right) at the steps worker 0 evaluated."""
    points = sorted((r for r in records if r.get("test_accuracy") is not None),
                    key=lambda r: r["pulled"])
    if started > 0:
        ax.axvspan(0, started, color="0.9")
    ax.set(xlabel="seconds since start", ylabel="test accuracy",
           title="held-out accuracy and loss during training")
    if not points:
        ax.text(0.5, 0.5, "not evaluated during training (eval_every 0)", ha="center",
                va="center", transform=ax.transAxes, color="0.4")
        return
    # At the time the evaluated step's weights arrived: the weights that were measured.
    at = [r["pulled"] for r in points]
    ax.plot(at, [r["test_accuracy"] for r in points], "o-", color="tab:blue", ms=3,
            label="test accuracy")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(at, [r["test_loss"] for r in points], "s--", color="tab:purple", ms=3,
              label="test loss")
    twin.set_ylabel("test loss")
    twin.set_ylim(bottom=0)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")


def _time_split(ax, split: list[dict]) -> None:
    """A bar per worker, stacked: compute, wire, blocked at barriers, evaluation."""
    workers = [s["worker"] for s in split]
    bottom = [0.0] * len(split)
    for name, label, colour in (("compute_s", "compute", "tab:green"),
                                ("wire_s", "wire (encode, transport, apply)", "tab:blue"),
                                ("blocked_s", "blocked at barrier / bound", "tab:red"),
                                ("eval_s", "held-out evaluation", "tab:purple")):
        heights = [s[name] for s in split]
        if name == "eval_s" and not any(heights):
            continue
        ax.bar(workers, heights, bottom=bottom, label=label, color=colour)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(xlabel="worker", ylabel="seconds", title="where each worker's time went",
           xticks=workers)
    ax.legend(fontsize=8)


def plot_shards(report: QualityReport, path: str | Path) -> Path:
    """Draw each worker's shard as a bar stacked by class into `path` (PNG); return the path."""
    path = Path(path)
    fig = draw_shards(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def draw_shards(report: QualityReport):
    """Each worker's shard as a bar stacked by class, as a matplotlib Figure."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: see write_report

    classes, workers = report.classes, report.workers
    # tab10/tab20 keep neighbouring classes apart; beyond 20 classes a gradient must do.
    cmap = colormaps["tab10" if classes <= 10 else "tab20" if classes <= 20 else "viridis"]
    fig = Figure(figsize=(max(5.0, 1.1 * workers + 2.5), 4.5))
    ax = fig.subplots()
    bottom = [0] * workers
    for c in range(classes):
        heights = [row[c] for row in report.shard_histograms]
        colour = cmap(c) if classes <= 20 else cmap(c / (classes - 1))
        ax.bar(range(workers), heights, bottom=bottom, color=colour, label=f"class {c}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(workers),
                  [f"worker {w}\nskew {s:.2f}" for w, s in enumerate(report.shard_skew)])
    # Stacked bars: autoscaling may stop at a lower layer's top, so the tallest stack is
    # set as the limit, with room above it.
    ax.set_ylim(0, max(max(bottom, default=0), 1) * 1.05)
    ax.set_ylabel("training examples")
    scheme = report.partition if report.alpha is None else \
        f"{report.partition} (alpha {report.alpha:g})"
    ax.set_title(f"{report.dataset}: {scheme}, {workers} workers; "
                 f"mean skew {report.mean_skew:.3f}")
    if classes <= 20:  # a legend of more entries hides the bars
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
