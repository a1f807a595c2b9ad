"""The commands that are one process of a cluster: `tinyps server` and `tinyps worker`.

Each is a process edge: it takes its settings whole (--settings, as the launcher gives them;
a cluster spec; or flags), sets what is process-wide (signal handlers, malloc tuning, dying
with its launcher) and runs one server or one worker until it is done.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ps.memory import keep_freed_buffers
from ps.security import SecurityConfig
from ps.server import ServerConfig, serve
from ps.settings import from_flat, leaves
from tinyps import roles
from tinyps.cli.flags import settings_from
from tinyps.processes import die_with_parent
from worker.process import WorkerSettings, run_worker_process

__all__ = ["server", "worker"]


def _given(args: argparse.Namespace, kind: type, spec_keys: tuple[str, ...]) -> list[str]:
    """The settings typed as flags (the token's environment default aside)."""
    return sorted(name for name in leaves(kind)
                  if hasattr(args, name) and name not in spec_keys)


def _settings(args: argparse.Namespace, kind: type, from_spec,
              spec_keys: tuple[str, ...] = ()):
    """A process's settings: from --settings (JSON, as the launcher gives them), from a
    cluster spec (`spec_keys`: the flags that pick this process in it), or from flags; never
    from a mix of them."""
    sources = [s for s in ("settings", "cluster") if getattr(args, s) is not None]
    if len(sources) > 1 or (sources and _given(args, kind, spec_keys)):
        typed = _given(args, kind, spec_keys)
        raise ValueError(f"give --{sources[0]} alone, or settings as flags: not both "
                         f"({', '.join(sources[1:] + typed)})")
    token = settings_from(args, SecurityConfig).get("token")
    if args.settings is not None:
        text = sys.stdin.read() if str(args.settings) == "-" else args.settings.read_text()
        return roles.from_json(kind, text, token)
    if args.cluster is not None:
        return from_spec(token)
    return from_flat(kind, settings_from(args, kind), where=f"tinyps {args.command}")


def server(args: argparse.Namespace) -> int:
    def from_spec(token: str | None) -> ServerConfig:
        from tinyps.spec import ClusterSpec  # only a spec's processes read one

        if args.index is None:
            raise ValueError("--cluster needs --index (which of the spec's servers this is)")
        return ClusterSpec.load(args.cluster).server_config(args.index, token=token)

    config = _settings(args, ServerConfig, from_spec)
    die_with_parent()
    keep_freed_buffers()
    running = serve(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    print(f"tinyps server: {config.store.mode} for {config.store.workers} workers on "
          f"{running.address}", file=sys.stderr, flush=True)
    if args.ready_file is not None:  # written whole, then renamed: a reader never sees half
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(running.address + "\n")
        tmp.replace(args.ready_file)
    running.wait()
    print("tinyps server: stopped", file=sys.stderr, flush=True)
    return 0


def worker(args: argparse.Namespace) -> int:
    spec = None

    def from_spec(token: str | None) -> WorkerSettings:
        nonlocal spec
        from tinyps.spec import ClusterSpec  # only a spec's processes read one

        spec = ClusterSpec.load(args.cluster)
        return spec.worker_settings(args.index, token=token)

    if args.run_dir is not None and args.cluster is None:
        raise ValueError("--run-dir is for a worker of a --cluster spec")
    if args.cluster is not None and not hasattr(args, "index"):
        raise ValueError("--cluster needs --index (which of the spec's workers this is)")
    if args.run_dir is not None and args.index != 0:
        raise ValueError("--run-dir is for worker 0, which writes the run's summary")
    settings = _settings(args, WorkerSettings, from_spec, spec_keys=("index",))
    die_with_parent()
    keep_freed_buffers()
    records = run_worker_process(settings)
    last = records[-1] if records else None
    print(f"tinyps worker {settings.index}: {len(records)} steps"
          + (f", last loss {last.loss:.4f}" if last else ""), file=sys.stderr)
    if spec is not None and args.run_dir is not None:
        from tinyps.spec import finish_run  # the one worker that writes a spec's results
        from tinyps.summary import format_summary

        summary = finish_run(spec, args.run_dir, [r.as_dict() for r in records],
                             settings.security.token)
        print(format_summary(summary, args.run_dir), flush=True)
    return 0
