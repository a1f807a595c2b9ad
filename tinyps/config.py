"""The settings of a run: `LaunchConfig`, which nests the parts' own configs.

Each setting is one field of the part that uses it (the store's, the training's, the
precision's ...), with its default, check and help there; this module adds the cluster's own
settings and the checks that span parts. The `tinyps launch` flags, `tinyps.launch(**kwargs)`
and config.json all name settings flat (`mode`, `epochs`, ...): see ps.settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from ps.gather import parse_aggregate
from ps.placement import PlacementConfig, TensorSpec
from ps.security import SecurityConfig, TLSFiles
from ps.server import CheckpointConfig
from ps.settings import from_flat, part, setting, to_flat
from ps.store_config import StoreConfig
from worker.model_spec import param_names, spec_of
from worker.poison import BYZANTINE, parse_poison
from worker.precision import PrecisionConfig
from worker.privacy import DPConfig, PrivacyConfig
from worker.process import TransportConfig
from worker.settings import SplitConfig, TrainConfig

__all__ = ["BACKENDS", "FaultConfig", "LaunchConfig", "parse_index_after", "parse_slow_worker"]

BACKENDS = ("local", "ray")


def parse_slow_worker(text: str) -> tuple[int, float]:
    """"1:5" -> (1, 5.0): worker 1 computes five times slower."""
    index, sep, factor = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(index), float(factor)
    except ValueError:
        raise ValueError(f"expected WORKER:FACTOR such as 1:5, got {text!r}") from None


def parse_index_after(text: str) -> tuple[int, int]:
    """"1:40" -> (1, 40): process 1, after 40 steps in all."""
    index, sep, after = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(index), int(after)
    except ValueError:
        raise ValueError(f"expected INDEX:STEPS, as in 1:40, got {text!r}") from None


@dataclass(frozen=True)
class FaultConfig:
    """Faults injected on purpose, and how many the launcher repairs."""

    slow_worker: tuple[int, float] | None = setting(
        None, "make worker I compute FACTOR times slower (a straggler)", metavar="I:FACTOR",
        parse=parse_slow_worker)
    kill_server: tuple[int, int] | None = setting(
        None, "injected fault: SIGKILL server I after STEPS steps in all", metavar="I:STEPS",
        parse=parse_index_after)
    kill_worker: tuple[int, int] | None = setting(
        None, "injected fault: SIGKILL worker J after STEPS steps in all", metavar="J:STEPS",
        parse=parse_index_after)
    max_restarts: int = setting(3, "dead servers and killed workers restarted, in all")
    freeze_timeout_s: float = setting(
        15.0, "a server whose health check has not answered for this many seconds is frozen "
              "(stopped, deadlocked): it is killed and restarted from its checkpoint, as a dead "
              "one is")
    byzantine: int = setting(
        0, "injected fault: workers 0..N-1 push their gradient times -10", metavar="N")
    poison_workers: int = setting(
        0, "injected fault: workers 0..N-1 are poisoned (see --poison)", metavar="N")
    poison: str = setting(BYZANTINE, "label_flip | random_labels | scaled_gradient:F")

    def __post_init__(self) -> None:
        if self.slow_worker is not None:
            index, factor = int(self.slow_worker[0]), float(self.slow_worker[1])
            object.__setattr__(self, "slow_worker", (index, factor))
            if index < 0 or not factor >= 1.0:
                raise ValueError(f"slow worker: expected a worker >= 0 and a factor >= 1, "
                                 f"got {index}:{factor:g}")
        for name in ("kill_server", "kill_worker"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
                if value[1] < 1:
                    raise ValueError(f"{name}: the step count must be >= 1, got {value[1]}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not 0 < self.freeze_timeout_s < float("inf"):
            raise ValueError(f"freeze_timeout_s must be a number of seconds > 0, got "
                             f"{self.freeze_timeout_s}")
        if self.byzantine < 0 or self.poison_workers < 0:
            raise ValueError(f"byzantine and poison_workers must be >= 0, got "
                             f"{self.byzantine}, {self.poison_workers}")
        parse_poison(self.poison)
        if self.byzantine:  # --byzantine N is poisoning with the Byzantine gradient
            if self.poison_workers not in (0, self.byzantine) or self.poison != BYZANTINE:
                raise ValueError("byzantine=N is poison_workers=N with poison "
                                 f"{BYZANTINE}: give one or the other")
            object.__setattr__(self, "poison_workers", self.byzantine)

    def slowdown(self, worker: int) -> float:
        if self.slow_worker and self.slow_worker[0] == worker:
            return self.slow_worker[1]
        return 1.0

    def poison_of(self, worker: int) -> str | None:
        return self.poison if worker < self.poison_workers else None


@dataclass(frozen=True)
class LaunchConfig:
    """A whole run: the cluster, and the parts each process takes whole."""

    servers: int = setting(2, "parameter-server processes")
    workers: int = setting(2, "worker processes")
    store: StoreConfig = part(StoreConfig)  # mode, staleness, aggregate, ... (the servers')
    train: TrainConfig = part(TrainConfig)
    split: SplitConfig = part(SplitConfig)
    placement: PlacementConfig = part(PlacementConfig)
    precision: PrecisionConfig = part(PrecisionConfig)
    # Tensors through shared-memory mailboxes where a server can map them (this host; never
    # with TLS), instead of in the gRPC messages: see ps/mailbox.py.
    transport: TransportConfig = part(TransportConfig)
    faults: FaultConfig = part(FaultConfig)
    checkpoint: CheckpointConfig = part(CheckpointConfig)
    resume: str | None = setting(
        None, "continue the run in DIR from its checkpoints (the number of servers may differ)",
        metavar="DIR")
    privacy: PrivacyConfig = part(PrivacyConfig)
    security: SecurityConfig = part(SecurityConfig)
    host: str = setting("127.0.0.1", "where the servers listen")
    startup_timeout_s: float = setting(60.0, "seconds for every process to report ready")
    backend: str = setting("local", "local: processes on this machine; ray: Ray actors on the "
                           "nodes of a Ray cluster (pip install 'tinyps[ray]')", choices=BACKENDS)
    ray_address: str | None = setting(
        None, "--backend ray: the Ray cluster to join (default: start one here)",
        metavar="ADDRESS")
    run_dir: str | None = setting(None, "where the run's files go (default: runs/<time>-...)")

    # Not settings of a launch, but set from its own: how many workers the servers wait for,
    # the servers' DP noise (from the privacy settings), and whether a server restores (the
    # launcher decides, per server).
    DERIVED: ClassVar[dict[str, str | None]] = {
        "store.workers": "workers", "store.dp_noise_std": None, "store.dp_seed": None,
        "checkpoint.restore": None}

    def __post_init__(self) -> None:
        for name in ("resume", "run_dir"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, str(value))
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self._check_dp()
        object.__setattr__(self, "store", replace(self.store, workers=self.workers,
                                                  **self._server_noise()))
        self._check()

    def _server_noise(self) -> dict:
        """The store's DP settings: noise on the sum of the workers' pushes (each a clipped
        sum / expected batch), when the servers add it."""
        dp = self.privacy.dp()
        if dp is None or dp.noise_at != "server":
            return {"dp_noise_std": 0.0, "dp_seed": None}
        return {"dp_noise_std": dp.noise * dp.clip / self.train.batch_size, "dp_seed": dp.seed}

    @classmethod
    def from_flat(cls, values: dict) -> LaunchConfig:
        """A config from settings by name (`mode="async", epochs=5`), as flags give them."""
        return from_flat(cls, values, where="launch")

    def replace(self, **values) -> LaunchConfig:
        """This config with some settings, by name, changed."""
        return LaunchConfig.from_flat({**to_flat(self, secrets=True), **values})

    def to_json(self) -> dict:
        """config.json: every setting by name; the token never written."""
        data = to_flat(self)
        data["token"] = None if self.security.token is None else "(set, not saved)"
        return data

    @classmethod
    def from_json(cls, data: dict) -> LaunchConfig:
        return cls.from_flat(data)

    # -- what the parts cannot check alone ---------------------------------------------------

    def _check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        workers, faults = self.workers, self.faults
        need(self.servers >= 1, f"servers must be >= 1, got {self.servers}")
        need(not self.checkpoint.restore, "restore is for one server; a run resumes with resume")
        need(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        need(self.backend in BACKENDS,
             f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(self.backend == "ray" or self.ray_address is None,
             "--ray-address is for --backend ray")
        if faults.slow_worker is not None:
            need(faults.slow_worker[0] < workers,
                 f"slow worker {faults.slow_worker[0]} is not one of workers 0..{workers - 1}")
        for name, count in (("kill_server", self.servers), ("kill_worker", workers)):
            if (value := getattr(faults, name)) is not None:
                need(0 <= value[0] < count, f"{name}: {value[0]} is not one of 0..{count - 1}")
        need(faults.byzantine <= workers,
             f"byzantine must be in 0..{workers} (workers 0..N-1 misbehave), "
             f"got {faults.byzantine}")
        need(faults.poison_workers <= workers,
             f"poison_workers must be in 0..{workers} (workers 0..N-1 are poisoned), "
             f"got {faults.poison_workers}")
        self._check_resume(need)
        # The placement names layers; check it against the model's layers now (the shapes
        # come from the data, but the names do not depend on them).
        specs = [TensorSpec(name, (1, 1) if name.endswith("weight") else (1,))
                 for name in param_names(spec_of(self.train))]
        self.placement.place(specs, self.servers)

    def _check_dp(self) -> None:
        """Before the store takes its noise: its own check would say less."""
        if not self.privacy.on:
            return
        rule, _ = parse_aggregate(self.store.aggregate)
        if self.privacy.dp_noise_at == "server" and not (self.store.mode == "sync"
                                                         and rule == "mean"):
            raise ValueError("--dp-noise-at server needs --mode sync and --aggregate mean: the "
                             "servers add the noise once to each step's sum")
        if self.train.loss_mean_over is not None:
            raise ValueError("DP-SGD divides its noisy sum by the batch size: "
                             "--loss-mean-over does not apply")
        if self.precision.precision != "fp32":
            raise ValueError("DP-SGD runs in fp32: per-example clipping is not emulated in "
                             f"{self.precision.precision}")

    def _check_resume(self, need) -> None:
        if self.resume is None:
            return
        need(Path(self.resume).is_dir(), f"resume: no directory {self.resume}")
        # A new run clears its own checkpoint folder: it must not be the one resumed from.
        source = self.resume_checkpoints().resolve()
        own = [Path(self.checkpoint.checkpoint_dir)] if self.checkpoint.checkpoint_dir else []
        if self.run_dir is not None:
            own += [Path(self.run_dir), Path(self.run_dir) / "checkpoints"]
        need(all(source != p.resolve() and p.resolve() not in source.parents for p in own),
             f"resume: {self.resume} would be overwritten by this run; give the new run its "
             f"own --run-dir and --checkpoint-dir")

    # -- what the launcher asks -------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.store.mode

    def resume_checkpoints(self) -> Path:
        """The checkpoint folder of the run resumed: DIR/checkpoints, or DIR itself."""
        source = Path(self.resume)
        return source / "checkpoints" if (source / "checkpoints").is_dir() else source

    def dp_config(self) -> DPConfig | None:
        """The workers' DP settings (the noise as resolved; see tinyps.privacy)."""
        return self.privacy.dp()

    @property
    def staleness_bound(self) -> int | None:
        """What summary.json reports: 0 for sync, K for ssp, None (no bound) for async."""
        return {"sync": 0, "ssp": self.store.staleness, "async": None}[self.store.mode]

    def tls(self, client: bool) -> TLSFiles | None:
        """TLS files for a server, or for a client of the servers (None: no TLS)."""
        return self.security.tls(client)

    def with_privacy(self, privacy: PrivacyConfig) -> LaunchConfig:
        return replace(self, privacy=privacy)

    def default_run_dir(self, stamp: str) -> Path:
        return Path("runs") / f"{stamp}-{self.mode}-s{self.servers}w{self.workers}"
