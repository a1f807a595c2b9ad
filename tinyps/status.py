"""`tinyps status`: a running cluster as a table, from the servers' own counters.

One row per server (what it holds, how busy it is, how stale the gradients it applies are)
and one line of worker clocks: load that other parameter servers hide, shown. A server that
did not answer within its deadline (frozen, overloaded, gone) is a row that says so.
"""

from __future__ import annotations

__all__ = ["status_table"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def status_table(stats: list[dict], previous: list[dict] | None = None,
                 interval_s: float = 0.0) -> str:
    """The table for one snapshot of `PSClient.stats()` (a server that did not answer: a
    dict of its index, address and "error"); rates need the previous snapshot."""
    header = ("server", "address", "mode", "tensors", "held", "push/s", "pull/s", "waiting",
              "staleness mean/max", "versions")
    rows = [header]
    before = {p["index"]: p for p in previous or [] if "error" not in p}
    for s in stats:
        if "error" in s:  # the long cell runs over the empty ones after it
            rows.append((str(s["index"]), s["address"], f"NOT ANSWERING: {s['error']}",
                         *[""] * 7))
            continue
        if s["index"] in before and interval_s > 0:
            push_rate = f"{(s['pushes'] - before[s['index']]['pushes']) / interval_s:.1f}"
            pull_rate = f"{(s['pulls'] - before[s['index']]['pulls']) / interval_s:.1f}"
        else:
            push_rate = pull_rate = "-"
        mean = s["staleness_sum"] / s["staleness_count"] if s["staleness_count"] else 0.0
        rows.append((
            str(s["index"]), s["address"], s["mode"], str(len(s["tensors"])),
            _size(s["bytes_held"]), push_rate, pull_rate, str(s["waiting"]),
            f"{mean:.2f} / {s['staleness_max']}", f"{s['min_version']}..{s['max_version']}",
        ))
    stats = [s for s in stats if "error" not in s]  # what follows is the answering servers'
    widths = [max(len(r[c]) for r in rows if c != 2 or not r[2].startswith("NOT ANSWERING"))
              for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    clocks: dict[int, int] = {}
    for s in stats:  # a worker's clock: the steps every server has received from it
        for worker, clock in s["clocks"].items():
            clocks[worker] = min(clock, clocks.get(worker, clock))
    # A worker no server waits for any more (dead, or silent past its lease) is marked.
    gone = {w for s in stats for w in clocks if w not in s.get("live_workers", clocks)}
    if clocks:
        lines.append("worker clocks (steps pushed): "
                     + ", ".join(f"{w}: {c}" + (" (gone)" if w in gone else "")
                                 for w, c in sorted(clocks.items())))
    suspects = sorted({w for s in stats for w in s.get("suspect_workers", [])})
    if suspects:
        lines.append("suspect workers (gradients unlike the others'): "
                     + ", ".join(map(str, suspects)))
    restored = [str(s["index"]) for s in stats if s.get("restored_from", -1) >= 0]
    if restored:
        lines.append(f"restored from a checkpoint: server {', '.join(restored)}")
    return "\n".join(lines)
