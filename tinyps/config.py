"""The settings of a run: one dataclass that the command line, the Python API and config.json
share. Every check runs here, before any process starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ps.optimizer import OPTIMIZERS, OptimizerConfig
from ps.placement import TensorSpec, place
from ps.security import TLSFiles, client_tls, server_tls
from ps.store import MODES, parse_aggregate
from worker.loop import WorkerConfig
from worker.partition import PARTITION_SCHEMES
from worker.poison import BYZANTINE, parse_poison
from worker.precision import GROWTH_INTERVAL, INIT_SCALE, PRECISIONS
from worker.privacy import DPConfig

__all__ = ["BACKENDS", "LaunchConfig"]

BACKENDS = ("local", "ray")



@dataclass(frozen=True)
class LaunchConfig:
    servers: int = 2  # parameter-server processes
    workers: int = 2  # worker processes
    mode: str = "sync"  # sync | async | ssp
    staleness: int = 0  # ssp's bound K, in steps
    staleness_lr: bool = False  # async/ssp: divide each step by its gradient's staleness
    max_staleness: int | None = None  # async/ssp: drop gradients staler than this
    dataset: str = "digits"  # digits | synthetic | mnist:DIR | csv:PATH
    hidden: tuple[int, ...] = (128,)  # hidden layer widths
    epochs: int = 20  # passes of each worker over its shard (unless steps is given)
    steps: int | None = None  # steps per worker; overrides epochs
    batch_size: int = 32  # per worker
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | momentum | adam
    momentum: float = 0.9  # for the momentum optimizer
    placement: str = "size_balanced"  # round_robin | size_balanced | "dense0=1,dense1=0"
    split_bytes: int | None = None  # split tensors larger than this across servers
    partition: str = "iid"  # iid | label_skew
    alpha: float = 0.5  # label_skew's Dirichlet concentration (smaller: more skew)
    slow_worker: tuple[int, float] | None = None  # (worker, factor): an injected straggler
    precision: str = "fp32"  # fp32 | fp16 | bf16: worker compute and wire traffic
    loss_scale: float | str = "auto"  # auto (dynamic for fp16, else off) | dynamic | off | N
    init_scale: float = INIT_SCALE  # dynamic loss scaling: the first scale ...
    growth_interval: int = GROWTH_INTERVAL  # ... and how many good steps in a row double it
    seed: int = 0
    fused: bool = True  # push a step and pull the next in one round trip
    # Tensors through shared-memory mailboxes where a server can map them (this host; never
    # with TLS), instead of in the gRPC messages: see ps/mailbox.py.
    shared_memory: bool = True
    run_dir: str | None = None  # default: runs/<time>-<mode>
    host: str = "127.0.0.1"  # where the servers listen
    tls_cert: str | None = None  # PEM: the servers' certificate (TLS for all traffic) ...
    tls_key: str | None = None  # ... and its key
    tls_ca: str | None = None  # PEM: a CA; given, servers demand client certificates (mTLS)
    token: str | None = field(default=None, repr=False)  # checked on every call; never saved
    startup_timeout_s: float = 60.0  # for every process to report ready
    backend: str = "local"  # local: processes on this machine; ray: Ray actors on its nodes
    ray_address: str | None = None  # backend ray: the cluster to join (None: start a local one)
    # Faults and recovery
    checkpoint_dir: str | None = None  # default: <run dir>/checkpoints, one folder per server
    checkpoint_every: int = 100  # a server writes its shard every this many updates
    keep_checkpoints: int = 3  # per server; older ones are deleted
    resume: str | None = None  # a run directory (or checkpoint folder) to continue from
    max_restarts: int = 3  # dead servers and workers restarted, in all, before giving up
    lease_s: float = 30.0  # a worker silent this long is dropped from the barriers
    backup_workers: int = 0  # sync: each step takes the first W-b gradients
    aggregate: str = "mean"  # sync: mean | median | trimmed_mean:F
    byzantine: int = 0  # injected fault: workers 0..N-1 push their gradient times -10 ...
    poison_workers: int = 0  # ... the same mechanism: workers 0..N-1 are poisoned ...
    poison: str = BYZANTINE  # ... with label_flip | random_labels | scaled_gradient:F
    # Differential privacy (DP-SGD): on when dp_noise or dp_target_epsilon is given
    dp_noise: float | None = None  # sigma, the noise multiplier
    dp_clip: float = 1.0  # C, the per-example L2 clip norm
    dp_delta: float = 1e-5
    dp_noise_at: str = "worker"  # worker | server (sync: a trusted aggregator adds it once)
    dp_target_epsilon: float | None = None  # choose sigma so that the run spends this epsilon
    dp_seed: int | None = None  # None: secret noise from the OS's entropy; an int: repeatable
    kill_server: tuple[int, int] | None = None  # injected fault: (server, after N steps) SIGKILL
    kill_worker: tuple[int, int] | None = None  # injected fault: (worker, after N steps) SIGKILL

    def __post_init__(self) -> None:
        hidden = self.hidden
        if isinstance(hidden, int):
            hidden = (hidden,)
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if self.slow_worker is not None:
            object.__setattr__(self, "slow_worker", (int(self.slow_worker[0]),
                                                     float(self.slow_worker[1])))
        if self.byzantine:  # --byzantine N is poisoning with the Byzantine gradient
            if self.poison_workers not in (0, self.byzantine) or self.poison != BYZANTINE:
                raise ValueError("byzantine=N is poison_workers=N with poison "
                                 f"{BYZANTINE}: give one or the other")
            object.__setattr__(self, "poison_workers", self.byzantine)
        for name in ("kill_server", "kill_worker"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        self._check()

    def _check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.servers >= 1, f"servers must be >= 1, got {self.servers}")
        need(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        need(self.staleness >= 0, f"staleness must be >= 0, got {self.staleness}")
        need(self.mode == "ssp" or self.staleness == 0,
             f"staleness (the ssp bound) is for --mode ssp, not {self.mode}")
        need(self.mode != "sync" or (not self.staleness_lr and self.max_staleness is None),
             "staleness_lr and max_staleness are for async and ssp: sync has no stale gradients")
        need(self.max_staleness is None or self.max_staleness >= 0,
             f"max_staleness must be >= 0, got {self.max_staleness}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(all(h >= 1 for h in self.hidden), f"hidden widths must be >= 1, got {self.hidden}")
        need(self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        OptimizerConfig(name=self.optimizer, lr=self.lr, momentum=self.momentum)
        need(self.partition in PARTITION_SCHEMES,
             f"partition must be one of {', '.join(PARTITION_SCHEMES)}, got {self.partition!r}")
        need(self.alpha > 0 and math.isfinite(self.alpha), f"alpha must be > 0, got {self.alpha}")
        need(self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        WorkerConfig(steps=1, precision=self.precision, loss_scale=self.loss_scale,
                     init_scale=self.init_scale, growth_interval=self.growth_interval)
        need(self.split_bytes is None or self.split_bytes >= 1,
             f"split_bytes must be >= 1, got {self.split_bytes}")
        if self.slow_worker is not None:
            index, factor = self.slow_worker
            need(0 <= index < self.workers,
                 f"slow worker {index} is not one of workers 0..{self.workers - 1}")
            need(factor >= 1.0, f"slow worker factor must be >= 1, got {factor}")
        need(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        need(self.backend in BACKENDS,
             f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(self.backend == "ray" or self.ray_address is None,
             "--ray-address is for --backend ray")
        self._check_faults(need)
        need(self.tls_ca is None or self.tls_cert is not None,
             "--tls-ca needs --tls-cert and --tls-key (the servers' own certificate)")
        self.tls(client=False)  # the files exist and come in pairs
        # The placement names layers; check it against the model's layers now (the widths
        # of input and output come from the data, but the names do not depend on them).
        sizes = (1, *self.hidden, 1)
        specs = [TensorSpec(f"dense{i}.{kind}", shape)
                 for i in range(len(sizes) - 1)
                 for kind, shape in (("weight", (sizes[i], sizes[i + 1])),
                                     ("bias", (sizes[i + 1],)))]
        place(specs, self.servers, self.placement, self.split_bytes)

    def _check_faults(self, need) -> None:
        need(self.checkpoint_every >= 1,
             f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1,
             f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.max_restarts >= 0, f"max_restarts must be >= 0, got {self.max_restarts}")
        need(self.lease_s > 0 and math.isfinite(self.lease_s),
             f"lease_s must be > 0, got {self.lease_s}")
        need(0 <= self.backup_workers < self.workers,
             f"backup_workers must be in 0..{self.workers - 1} (fewer than the workers), "
             f"got {self.backup_workers}")
        need(self.mode == "sync" or self.backup_workers == 0,
             f"backup_workers ({self.backup_workers}) is for --mode sync: async and ssp never "
             f"wait for the last gradient")
        rule, _ = parse_aggregate(self.aggregate)
        need(self.mode == "sync" or rule == "mean",
             f"--aggregate {self.aggregate} is for --mode sync: async and ssp apply each "
             f"gradient alone")
        need(0 <= self.byzantine <= self.workers,
             f"byzantine must be in 0..{self.workers} (workers 0..N-1 misbehave), "
             f"got {self.byzantine}")
        need(0 <= self.poison_workers <= self.workers,
             f"poison_workers must be in 0..{self.workers} (workers 0..N-1 are poisoned), "
             f"got {self.poison_workers}")
        parse_poison(self.poison)
        self._check_dp(need)
        for name, count in (("kill_server", self.servers), ("kill_worker", self.workers)):
            if (value := getattr(self, name)) is not None:
                need(0 <= value[0] < count,
                     f"{name}: {value[0]} is not one of 0..{count - 1}")
                need(value[1] >= 1, f"{name}: the step count must be >= 1, got {value[1]}")
        if self.resume is not None:
            need(Path(self.resume).is_dir(), f"resume: no directory {self.resume}")
            # A new run clears its own checkpoint folder: it must not be the one resumed from.
            source = self.resume_checkpoints().resolve()
            own = [Path(self.checkpoint_dir)] if self.checkpoint_dir else []
            if self.run_dir is not None:
                own += [Path(self.run_dir), Path(self.run_dir) / "checkpoints"]
            need(all(source != p.resolve() and p.resolve() not in source.parents
                     for p in own),
                 f"resume: {self.resume} would be overwritten by this run; give the new run "
                 f"its own --run-dir and --checkpoint-dir")

    def _check_dp(self, need) -> None:
        if not self.dp:
            need(self.dp_seed is None and self.dp_noise_at == "worker",
                 "dp settings need --dp-noise or --dp-target-epsilon")
            return
        need(self.dp_target_epsilon is None or self.dp_target_epsilon > 0,
             f"dp_target_epsilon must be > 0, got {self.dp_target_epsilon}")
        DPConfig(noise=self.dp_noise or 0.0, clip=self.dp_clip, delta=self.dp_delta,
                 noise_at=self.dp_noise_at)
        need(self.dp_noise_at == "worker" or (self.mode == "sync" and
                                              self.aggregate == "mean"),
             "--dp-noise-at server needs --mode sync and --aggregate mean: the servers add "
             "the noise once to each step's sum")
        need(self.precision == "fp32", "DP-SGD runs in fp32: per-example clipping is not "
                                      f"emulated in {self.precision}")

    def resume_checkpoints(self) -> Path:
        """The checkpoint folder of the run resumed: DIR/checkpoints, or DIR itself."""
        source = Path(self.resume)
        return source / "checkpoints" if (source / "checkpoints").is_dir() else source

    @property
    def dp(self) -> bool:
        """Whether the run trains with DP-SGD."""
        return self.dp_noise is not None or self.dp_target_epsilon is not None

    def dp_config(self) -> DPConfig | None:
        """The workers' DP settings (the noise as resolved; see tinyps.privacy)."""
        if not self.dp:
            return None
        return DPConfig(noise=self.dp_noise or 0.0, clip=self.dp_clip, delta=self.dp_delta,
                        noise_at=self.dp_noise_at, seed=self.dp_seed)

    @property
    def staleness_bound(self) -> int | None:
        """What summary.json reports: 0 for sync, K for ssp, None (no bound) for async."""
        return {"sync": 0, "ssp": self.staleness, "async": None}[self.mode]

    def slowdown(self, worker: int) -> float:
        if self.slow_worker and self.slow_worker[0] == worker:
            return self.slow_worker[1]
        return 1.0

    def tls(self, client: bool) -> TLSFiles | None:
        """TLS files for a server, or for a client of the servers (None: no TLS)."""
        make = client_tls if client else server_tls
        return make(self.tls_cert, self.tls_key, self.tls_ca)

    def to_json(self) -> dict:
        data = asdict(self)
        data["token"] = None if self.token is None else "(set, not saved)"
        return data

    @classmethod
    def from_json(cls, data: dict) -> LaunchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        return cls(**data)

    def default_run_dir(self, stamp: str) -> Path:
        return Path("runs") / f"{stamp}-{self.mode}-s{self.servers}w{self.workers}"
