"""The commands that are one process of a cluster: `tinyps server` and `tinyps worker`.

Each is a process edge: it takes its settings whole (--settings, as the launcher gives them;
a cluster spec; or flags), sets what is process-wide (signal handlers, malloc tuning, dying
with its launcher) and runs one server or one worker until it is done.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ps.memory import keep_freed_buffers
from ps.security import SecurityConfig
from ps.server import RunningServer, ServerConfig, serve
from ps.settings import from_flat, leaves
from tinyps import roles
from tinyps.cli.flags import settings_from
from tinyps.processes import die_with_parent
from worker.process import WorkerSettings, run_worker_process

__all__ = ["server", "serving_line", "worker"]

# After a stop begins: how long a server may take to end its calls and write its final
# checkpoint (RunningServer.stop's own waits add up to less) before the process exits anyway.
_STOP_DEADLINE_S = 60.0


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


def _stop_on_signals(running: RunningServer) -> threading.Event:
    """SIGTERM and SIGINT stop the server once, in a thread of its own; the event is set
    when a stop begins (or the server stopped by itself). The handler never blocks: a second
    or third signal, while the first stop writes its checkpoint, only says it is under way
    (a handler that stopped again would wait on the first stop: a hang)."""
    stopping = threading.Event()

    def watch() -> None:  # the Shutdown call stops the server without a signal
        running.wait()
        stopping.set()

    threading.Thread(target=watch, name="stopped", daemon=True).start()

    def handle(signum: int, frame: object) -> None:
        if stopping.is_set():
            # os.write, not print: a handler may run in the middle of a print of the main
            # thread, and print is not reentrant.
            os.write(2, b"tinyps server: already stopping (writing its final checkpoint)\n")
            return
        stopping.set()
        threading.Thread(target=running.stop, name="stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return stopping


def _interrupt_once() -> None:
    """The first SIGINT or SIGTERM unwinds the worker (KeyboardInterrupt); the ones after it
    are ignored, so that they cannot break the unwinding half-way."""
    fired = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if not fired.is_set():
            fired.set()
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def serving_line(config: ServerConfig, address: str) -> str:
    """The line a server logs once it listens: its rule, its workers, its address and how it
    is guarded, so that a log says whether TLS and the token were on."""
    workers = config.store.workers
    return (f"tinyps server: {config.store.mode} for {workers} worker{'s' * (workers != 1)} on "
            f"{address}, {config.security.describe()}")


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
    stopping = _stop_on_signals(running)
    print(serving_line(config, running.address), file=sys.stderr, flush=True)
    if args.ready_file is not None:  # written whole, then renamed: a reader never sees half
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(running.address + "\n")
        tmp.replace(args.ready_file)
    stopping.wait()  # for a signal, or the Shutdown call (which also stops the server)
    stopped = running.wait(_STOP_DEADLINE_S)
    # From here the process only exits: a signal pressed again now must not kill it by its
    # default action (the interpreter's exit restores it), which would turn exit 0 into -2.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if not stopped:
        print(f"tinyps server: did not stop within {_STOP_DEADLINE_S:.0f} s of being told "
              f"to; exiting without its final checkpoint", file=sys.stderr, flush=True)
        return 1
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
    _interrupt_once()
    try:
        records = run_worker_process(settings)
    except KeyboardInterrupt:
        # Unwound (its metrics file closed, its client closed); now end at once: the exit
        # would otherwise join the client's threads, one of which may wait minutes in a
        # barrier's pull.
        print(f"tinyps worker {settings.index}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
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
