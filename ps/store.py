"""The store: this server's shard of the parameters, their versions and optimizer state.

It decides, for the consistency mode, when a pushed gradient is applied and when a pull may be
answered; which workers a barrier waits for (live ones: a dead worker is removed, a returning
one rejoins); and it counts what happened. It knows nothing of gRPC: the servicer translates.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from kernels import (
    aggregate_median,
    aggregate_trimmed_mean,
    all_finite,
    bf16_all_finite,
    bf16_decode,
    fp16_all_finite,
    fp16_decode,
)
from ps.keys import Key, KeyId
from ps.optimizer import Optimizer, OptimizerConfig
from ps.snapshot import KeyState, Snapshot
from ps.watch import GradientWatch

__all__ = [
    "AGGREGATES", "MODES", "BadRequest", "Closed", "LayoutConflict", "NotInitialised", "Packed",
    "Store", "StoreConfig", "StoreError", "StepOutOfRange", "UnknownKey", "WaitTimeout",
    "parse_aggregate",
]

MODES = ("sync", "async", "ssp")
AGGREGATES = ("mean", "median", "trimmed_mean")  # trimmed_mean:F trims F of each end

T = TypeVar("T")
_SKIPPED = object()  # sync: a step's partial sum once any worker has skipped it
# 16-bit gradient formats: their decoders to float32, and their finiteness checks on the codes.
_DECODE = {"float16": fp16_decode, "bfloat16": bf16_decode}
_FINITE = {"float16": fp16_all_finite, "bfloat16": bf16_all_finite}


class StoreError(Exception):
    """A request the store refused; the message names the input and the problem."""


class UnknownKey(StoreError):
    pass


class BadRequest(StoreError):
    pass


class NotInitialised(StoreError):
    pass


class LayoutConflict(StoreError):
    pass


class StepOutOfRange(StoreError):
    pass


class WaitTimeout(StoreError):
    pass


class Closed(StoreError):
    pass


@dataclass(frozen=True)
class Packed:
    """A gradient still in the 16-bit format it travelled in: the uint16 codes of float16 or
    bfloat16 values. The store decodes it to float32 only where it must; plain SGD in async
    and ssp mode updates straight from the codes (Optimizer.step_codes), which saves writing
    and reading a float32 copy."""

    codes: np.ndarray  # uint16
    fmt: str  # "float16" | "bfloat16"

    def __post_init__(self) -> None:
        if self.fmt not in _DECODE:
            raise ValueError(f"Packed: fmt must be one of {', '.join(_DECODE)}, got {self.fmt!r}")
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype != np.uint16:
            raise ValueError(f"Packed: codes must be a uint16 array, got "
                             f"{getattr(self.codes, 'dtype', type(self.codes).__name__)}")

    def decode(self) -> np.ndarray:
        """The float32 values (a new array)."""
        return _DECODE[self.fmt](self.codes)


@dataclass(frozen=True)
class StoreConfig:
    mode: str = "sync"  # "sync" | "async" | "ssp"
    workers: int = 1  # how many workers push; sync averages this many gradients per step
    staleness: int = 0  # ssp bound K, in clocks (steps)
    staleness_lr: bool = False  # async/ssp: divide the step size by the gradient's staleness
    max_staleness: int | None = None  # async/ssp: drop (and count) gradients staler than this
    backup_workers: int = 0  # sync: a step completes with the first W-b gradients
    aggregate: str = "mean"  # sync: mean | median | trimmed_mean:F (robust to bad workers)
    lease_s: float | None = 30.0  # a worker silent this long (no call in flight) is removed
    # sync, DP-SGD with a trusted aggregator: N(0, s^2) noise added to the sum of each step's
    # gradients (so the mean gets s / count), once, instead of by every worker.
    dp_noise_std: float = 0.0
    dp_seed: int | None = None  # None: noise from the OS's entropy (secret, as privacy needs)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not 0 <= self.backup_workers < self.workers:
            raise ValueError(f"backup_workers must be in 0..{self.workers - 1} (fewer than the "
                             f"workers), got {self.backup_workers}")
        if self.backup_workers and self.mode != "sync":
            raise ValueError("backup_workers is for sync mode: async and ssp never wait for a "
                             "step's last gradient")
        name, _ = parse_aggregate(self.aggregate)
        if name != "mean" and self.mode != "sync":
            raise ValueError(f"aggregate {self.aggregate!r} is for sync mode: async and ssp "
                             f"apply each gradient alone")
        if self.lease_s is not None and not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s}")
        if not (math.isfinite(self.dp_noise_std) and self.dp_noise_std >= 0):
            raise ValueError(f"dp_noise_std must be >= 0, got {self.dp_noise_std}")
        if self.dp_noise_std and (self.mode != "sync" or name != "mean"):
            raise ValueError("server-side DP noise needs sync mode and mean aggregation: it is "
                             "added once to each step's sum of gradients")


def parse_aggregate(text: str) -> tuple[str, float]:
    """"mean", "median" or "trimmed_mean:F" -> (rule, F); F is the fraction cut off each end."""
    name, _, arg = text.partition(":")
    if name not in AGGREGATES:
        raise ValueError(f"aggregate must be one of mean, median, trimmed_mean:F, got {text!r}")
    if name != "trimmed_mean":
        if arg:
            raise ValueError(f"aggregate {name} takes no argument, got {text!r}")
        return name, 0.0
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"aggregate trimmed_mean needs a fraction, as in trimmed_mean:0.25; "
                         f"got {text!r}") from None
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"aggregate {text!r}: the trimmed fraction must be in [0, 0.5), "
                         f"got {fraction}")
    return name, fraction


@dataclass
class _Slot:
    """One key's state: its values, version, per-worker next step, sync partial sums."""

    key: Key
    value: np.ndarray | None  # float32 (size,); None until Init sends values
    next_step: np.ndarray  # int64 (workers,): the step each worker must push next
    version: int = 0  # updates applied
    pending: dict[int, _Step] = field(default_factory=dict)  # sync: the steps not yet applied


@dataclass
class _Step:
    """sync: what one step of one key has gathered so far."""

    # Each worker's gradient, in arrival order: the rules aggregate them, and the watch
    # compares each with the others'.
    grads: dict[int, np.ndarray] = field(default_factory=dict)
    workers: set[int] = field(default_factory=set)  # the workers whose pushes are in
    skipped: bool = False  # a worker found inf/NaN: nobody's gradient of the step is applied


@dataclass
class _Counters:
    pushes: int = 0
    pulls: int = 0
    updates: int = 0
    dropped_stale: int = 0
    dropped_gradients: int = 0  # sync: worker-steps that came after their step was applied
    staleness_hist: list[int] = field(default_factory=list)  # [s]: applied with staleness s
    waiting: int = 0


class Store:
    """This server's keys. Every public method is thread-safe and checks before it changes."""

    def __init__(self, config: StoreConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock_s = clock  # for leases; tests pass a clock they move by hand
        self._aggregate = parse_aggregate(config.aggregate)
        self._cond = threading.Condition()
        self._slots: dict[KeyId, _Slot] = {}
        self._layout: tuple[Key, ...] | None = None
        self._optimizer: Optimizer | None = None
        self._pending_values = 0  # keys still without values
        self._counters = _Counters()
        self._started: set[int] = set()  # workers that have asked for step 0
        self._skipped: set = set()  # steps skipped for inf/NaN: sync step, or (worker, step)
        # Barriers wait for the live workers. A removed worker (dead, or its lease expired)
        # and, after a restore, every worker, "rejoins": its next call may move its clock
        # forward to wherever it is now, since this store has lost track of it.
        self._live: set[int] = set(range(config.workers))
        self._rejoining: set[int] = set()
        # worker -> when its last call ended. A worker that has never called has no lease to
        # lose: the start line waits for it (a launcher that sees it die says so: Leave).
        self._last_seen: dict[int, float] = {}
        self._in_flight: dict[int, int] = {}  # worker -> its calls inside the store now
        self._last_dropped: dict[int, int] = {}  # worker -> its latest step dropped as late
        self._restored_seq = -1  # the checkpoint this store was restored from
        self._watch = GradientWatch()  # sync: per-worker gradient statistics, for suspects
        self._skipped_before = 0  # steps skipped before that checkpoint
        self._closed = False

    # -- initialisation -------------------------------------------------------------------

    def init(
        self,
        keys: list[Key],
        optimizer: OptimizerConfig,
        values: dict[KeyId, np.ndarray],
    ) -> tuple[bool, int]:
        """Set the layout (the first call wins) and the first values of keys.

        Returns (this call set the layout, keys still without values). A layout or optimizer
        that differs from the one set is refused: two workers disagree about the model.
        """
        layout = tuple(keys)
        _check_layout(layout)
        with self._cond:
            self._check_open()
            created = self._layout is None
            if not created:
                if layout != self._layout:
                    raise LayoutConflict(
                        f"init: this server already holds another layout ({len(self._layout)} "
                        f"keys, first {self._layout[0]}); got {len(layout)} keys, first "
                        f"{layout[0]}: do the workers build the same model and placement?"
                    )
                if optimizer != self._optimizer.config:
                    raise LayoutConflict(
                        f"init: optimizer {optimizer} differs from the one already set "
                        f"({self._optimizer.config})"
                    )
            by_id = {k.id: k for k in layout}
            for key_id, value in values.items():
                if key_id not in by_id:
                    raise UnknownKey(f"init: {key_id[0]!r} at {key_id[1]} is not in the layout")
                _check_values("init", by_id[key_id], value)
            if created:
                self._layout = layout
                self._optimizer = Optimizer(optimizer, {str(k): (k.size,) for k in layout})
                workers = self.config.workers
                self._slots = {
                    k.id: _Slot(k, None, np.zeros(workers, np.int64)) for k in layout
                }
                self._pending_values = len(layout)
            for key_id, value in values.items():
                slot = self._slots[key_id]
                if slot.value is None:  # the first values win
                    slot.value = np.array(value, dtype=np.float32, copy=True)
                    self._pending_values -= 1
            self._cond.notify_all()
            return created, self._pending_values

    # -- pull -----------------------------------------------------------------------------

    def pull(
        self,
        key_ids: list[KeyId] | None,
        worker: int,
        step: int,
        timeout: float,
        read: Callable[[list[tuple[Key, np.ndarray, int]]], T] | None = None,
    ) -> T | list[tuple[Key, np.ndarray, int]]:
        """The values of `key_ids` (None: all) with their versions, as (key, values, version).

        step < 0, or async mode: at once. sync: once every key has applied `step` updates.
        ssp: once the slowest live worker's clock is at least step - K. Waits at most
        `timeout` s.

        Without `read`, the values are copies. With it, `read` is called under the lock with
        views of the live values and its result returned: a reader that serialises them makes
        its one copy a consistent snapshot too, instead of copying twice.
        """
        with self._cond:
            self._check_ready()
            slots = self._select(key_ids)
            if step >= 0:
                self._check_worker(worker)
                with self._calling(worker):
                    self._arrive(worker, step)
                    self._wait_for_step(slots, worker, step, timeout)
            self._counters.pulls += 1
            if read is None:
                return [(s.key, s.value.copy(), s.version) for s in slots]
            return read([(s.key, s.value, s.version) for s in slots])

    def _wait_for_step(self, slots: list[_Slot], worker: int, step: int, timeout: float) -> None:
        if step == 0:
            # The start line: a run begins when every live worker has asked for step 0, so
            # that no worker races ahead while the others are still starting up.
            self._started.add(worker)
            self._cond.notify_all()
            self._wait(lambda: self._live <= self._started, timeout,
                       f"worker {worker} waiting at the start for workers "
                       f"{sorted(self._live - self._started)}")
        if self.config.mode == "async":
            return
        clock = self._clock(worker, slots)
        if step > clock:
            raise StepOutOfRange(
                f"pull: worker {worker} asked for step {step}, but its next step is "
                f"{clock} (it has pushed {clock} steps)"
            )
        self._wait(lambda: self._ready(slots, step), timeout,
                   f"pull of step {step} by worker {worker}")

    def _ready(self, slots: list[_Slot], step: int) -> bool:
        if self.config.mode == "sync":
            return all(s.version >= step for s in slots)
        # ssp, key by key: every live worker has pushed at least step - K steps of these keys.
        return self._min_clock(slots) >= step - self.config.staleness

    # -- push -----------------------------------------------------------------------------

    def push(
        self,
        worker: int,
        step: int,
        grads: dict[KeyId, tuple[np.ndarray | Packed, int]],
        scale: float = 1.0,
        skip: bool = False,
        owned: bool = False,
    ) -> tuple[int, int, int]:
        """Take worker's gradients for `step`: {key: (gradient, version it was computed from)}.

        `scale`: the gradients are multiplied by a loss scale, divided out here in fp32.
        `skip`: the worker found inf or NaN; its gradients are empty, the step counts, nothing
        is applied (sync: the whole step is skipped by everyone, so that all W workers and
        their loss scalers stay in step).
        `owned`: the arrays are the store's to keep (the caller made them for this push and
        will not touch them again), so sync mode keeps them without a copy.
        A gradient may also come as Packed 16-bit codes: they are checked as codes, and
        decoded to float32 unless the update reads the codes itself (see _unpack).
        Returns (keys accepted, keys already pushed for this step: acknowledged, not applied,
        the largest staleness among the gradients applied now).
        Every check runs first: a refused push changes nothing and uses up no step.
        """
        grads, decoded = self._unpack(grads, skip)
        with self._cond:
            self._check_ready()
            self._check_worker(worker)
            if step < 0:
                raise StepOutOfRange(f"push: step must be >= 0, got {step}")
            if not (math.isfinite(scale) and scale > 0):
                raise BadRequest(f"push: the gradient scale must be finite and > 0, got {scale}")
            # A rejoining worker's clock moves up to `step`, and the versions it read may be
            # ahead of a restored store's: it was computing while this store was gone.
            rejoining = worker in self._rejoining
            fresh = []
            for key_id, (grad, read_version) in grads.items():
                slot = self._slot(key_id, "push")
                if skip:
                    if grad.size:
                        raise BadRequest(f"push {slot.key}: a skipped step carries no values")
                else:
                    _check_gradient("push", slot.key, grad)
                expected = int(slot.next_step[worker])
                if rejoining:
                    expected = max(expected, step)
                    read_version = min(read_version, slot.version)
                if step > expected:
                    raise StepOutOfRange(
                        f"push {slot.key}: step {step} is beyond worker {worker}'s next step "
                        f"{expected}"
                    )
                if read_version < 0 or read_version > slot.version:
                    raise BadRequest(
                        f"push {slot.key}: computed from version {read_version}, but the key is "
                        f"at version {slot.version}"
                    )
                if step == expected:
                    fresh.append((slot, grad, read_version, owned or key_id in decoded))
            with self._calling(worker):
                self._arrive(worker, step)
                staleness_max = self._take(worker, step, fresh, scale, skip)
            self._counters.pushes += 1
            self._cond.notify_all()
            return len(fresh), len(grads) - len(fresh), staleness_max

    def _unpack(self, grads: dict[KeyId, tuple[np.ndarray | Packed, int]],
                skip: bool) -> tuple[dict[KeyId, tuple[np.ndarray | Packed, int]], set[KeyId]]:
        """The gradients with Packed ones decoded to float32, unless the update reads codes
        itself (async or ssp, an optimizer that fuses them: plain SGD); and the keys decoded
        here (new arrays: the store's to keep).

        Runs before the lock is taken, so that other pushes need not wait for the decoding.
        The optimizer is set once (init, restore) and never replaced, so reading it unlocked
        is safe; before it is set everything is decoded, and the push is then refused.
        """
        optimizer = self._optimizer
        fused = (not skip and self.config.mode != "sync" and optimizer is not None
                 and optimizer.fuses_codes)
        if fused or not any(isinstance(grad, Packed) for grad, _ in grads.values()):
            return grads, set()  # float32 pushes (most of them) pass as they came
        out, decoded = {}, set()
        for key_id, (grad, read_version) in grads.items():
            if isinstance(grad, Packed):
                grad = grad.decode()
                decoded.add(key_id)
            out[key_id] = (grad, read_version)
        return out, decoded

    def _take(self, worker: int, step: int, fresh: list, scale: float, skip: bool) -> int:
        """Apply or gather the checked gradients of one push; the largest staleness applied.
        `fresh`: (slot, gradient, version read, whether the array is the store's to keep)."""
        staleness_max = 0
        late = False
        for slot, grad, read_version, owned in fresh:
            slot.next_step[worker] += 1
            # Packed codes are unscaled by the update itself, in the same pass.
            if not skip and scale != 1.0 and not isinstance(grad, Packed):
                grad = grad / np.float32(scale)  # unscale in fp32, as GradScaler does: a new
                owned = True  # array, ours to keep
            if self.config.mode == "sync":
                if step < slot.version:
                    late = True  # the step was applied without it (backup workers, rejoin)
                else:
                    self._accumulate(slot, worker, step, None if skip else grad, owned)
            elif skip:
                self._skipped.add((worker, step))
            else:
                staleness_max = max(staleness_max,
                                    self._apply_one(slot, grad, read_version, scale))
        if late and self._last_dropped.get(worker) != step:
            self._last_dropped[worker] = step  # a step's requests to this server count once
            self._counters.dropped_gradients += 1
        return staleness_max

    def _accumulate(self, slot: _Slot, worker: int, step: int, grad: np.ndarray | None,
                    owned: bool = False) -> None:
        """sync: gather the step's gradients; once enough are in, apply them as one update.

        grad None: that worker skipped the step (inf or NaN); then nobody's gradient of the
        step is applied, but the version still advances so that steps and versions stay equal.
        """
        entry = slot.pending.setdefault(step, _Step())
        entry.workers.add(worker)
        if grad is None:
            entry.skipped = True
            entry.grads.clear()
        elif not entry.skipped:
            # Unless it is ours, a copy: the gradient may be a view of the request's bytes,
            # gone after the call.
            entry.grads[worker] = grad if owned else np.array(grad, np.float32, copy=True)
        self._advance(slot)

    def _advance(self, slot: _Slot) -> None:
        """Apply the key's complete steps, in order: a step is complete once every live
        worker has pushed it, or with b backup workers the first live W-b of them."""
        needed = max(1, len(self._live) - self.config.backup_workers)
        while (entry := slot.pending.get(slot.version)) and (
                len(entry.workers & self._live) >= needed
                or self._none_to_come(slot, slot.version, entry)):
            del slot.pending[slot.version]
            if entry.skipped:
                self._skipped.add(slot.version)
            else:
                update = self._combine(entry)
                self._watch.observe(entry.grads)
                if self.config.dp_noise_std:
                    update += self._dp_noise(slot, len(entry.workers))
                self._optimizer.step(str(slot.key), slot.value, update)
                self._counters.updates += 1
                self._record_staleness(0, len(entry.workers))
            slot.version += 1

    def _none_to_come(self, slot: _Slot, step: int, entry: _Step) -> bool:
        """Every live worker has pushed `step` here or is past it. A worker past it whose
        gradient is not in: it went to this server before a restart, and will not come again
        (waiting for it would wait forever)."""
        return all(w in entry.workers or slot.next_step[w] > step for w in self._live)

    def _combine(self, entry: _Step) -> np.ndarray:
        rule, fraction = self._aggregate
        grads = list(entry.grads.values())
        if rule == "mean":
            total = grads[0] + grads[1] if len(grads) > 1 else grads[0].copy()
            for g in grads[2:]:  # summed in arrival order
                total += g
            return np.divide(total, np.float32(len(grads)), out=total)
        stacked = np.stack(grads)
        if rule == "median":
            return aggregate_median(stacked)
        return aggregate_trimmed_mean(stacked, fraction)

    def _dp_noise(self, slot: _Slot, count: int) -> np.ndarray:
        """The trusted aggregator's noise for one step of one key, as the mean receives it.
        Seeded: one generator per (key, step), so that a run repeats whatever order the
        keys complete in; unseeded: the OS's entropy."""
        seed = self.config.dp_seed
        rng = np.random.default_rng(
            None if seed is None else (seed, zlib.crc32(slot.key.name.encode()), slot.key.start,
                                       slot.version))
        std = self.config.dp_noise_std / count
        return rng.normal(0.0, std, slot.key.size).astype(np.float32)

    def _apply_one(self, slot: _Slot, grad: np.ndarray | Packed, read_version: int,
                   scale: float = 1.0) -> int:
        """async / ssp: apply on arrival, unless staler than allowed. Returns the staleness.
        `scale`: the loss scale still in Packed codes (a float32 gradient is unscaled)."""
        staleness = slot.version - read_version
        limit = self.config.max_staleness
        if limit is not None and staleness > limit:
            self._counters.dropped_stale += 1
            return staleness
        lr = None
        if self.config.staleness_lr and staleness > 1:
            lr = self._optimizer.config.lr / staleness  # Zhang et al. 2016
        if isinstance(grad, Packed):  # decoded, unscaled and applied in one pass
            self._optimizer.step_codes(str(slot.key), slot.value, grad.codes, grad.fmt, scale,
                                       lr=lr)
        else:
            self._optimizer.step(str(slot.key), slot.value, grad, lr=lr)
        slot.version += 1
        self._counters.updates += 1
        self._record_staleness(staleness, 1)
        return staleness

    def _record_staleness(self, staleness: int, count: int) -> None:
        hist = self._counters.staleness_hist
        if len(hist) <= staleness:
            hist.extend([0] * (staleness + 1 - len(hist)))
        hist[staleness] += count

    # -- workers coming and going ---------------------------------------------------------

    def remove_worker(self, worker: int) -> bool:
        """Stop waiting for `worker` (it died, or its lease expired); False if it was not live.

        Its gradients already gathered stay. If it calls again it rejoins, at its new step.
        """
        with self._cond:
            self._check_worker(worker)
            removed = worker in self._live
            if removed:
                self._remove(worker)
            return removed

    def expire_leases(self) -> list[int]:
        """Remove the live workers silent for longer than the lease; return them."""
        with self._cond:
            return self._expire_leases()

    def start_step(self, worker: int) -> int:
        """The step a (re)starting worker begins at: its own clock, or in sync and ssp, where
        the others are if they are ahead (the steps it missed are theirs now)."""
        with self._cond:
            self._check_ready()
            self._check_worker(worker)
            own = self._clock(worker)
            if self.config.mode == "async":
                return own
            if self.config.mode == "sync":
                return max(own, min(s.version for s in self._slots.values()))
            others = [self._clock(w) for w in self._live if w != worker]
            return max(own, min(others, default=own))

    def _remove(self, worker: int) -> None:
        self._live.discard(worker)
        self._rejoining.add(worker)
        self._catch_up()
        self._cond.notify_all()

    def _expire_leases(self) -> list[int]:
        lease = self.config.lease_s
        if lease is None:
            return []
        now = self._clock_s()
        expired = [w for w in sorted(self._live)
                   if not self._in_flight.get(w) and w in self._last_seen
                   and now - self._last_seen[w] > lease]
        for w in expired:
            self._remove(w)
        return expired

    def _arrive(self, worker: int, step: int) -> None:
        """A call of `worker` at `step`: a rejoining worker is live again, at that step."""
        if worker not in self._rejoining:
            return
        self._rejoining.discard(worker)
        self._live.add(worker)
        self._started.add(worker)
        for slot in self._slots.values():
            slot.next_step[worker] = max(int(slot.next_step[worker]), step)
        self._catch_up()
        self._cond.notify_all()

    def _catch_up(self) -> None:
        """sync, after the live set or a clock changed: apply the steps now complete; and a
        key whose every live worker is past its version (a restored store, rejoined by
        workers that are further on) jumps ahead to them, its unfinished steps dropped."""
        if self.config.mode != "sync" or not self._live:
            return
        for slot in self._slots.values():
            self._advance(slot)
            target = min(int(slot.next_step[w]) for w in self._live)
            if target > slot.version:
                for old in [t for t in slot.pending if t < target]:
                    del slot.pending[old]
                slot.version = target
                self._advance(slot)

    @contextmanager
    def _calling(self, worker: int) -> Iterator[None]:
        """Mark a call of `worker` in progress: a worker waiting on a barrier is not silent."""
        self._in_flight[worker] = self._in_flight.get(worker, 0) + 1
        try:
            yield
        finally:
            self._in_flight[worker] -= 1
            self._last_seen[worker] = self._clock_s()

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This shard's state now, copied: what a checkpoint writes.

        sync: a step still gathering gradients is not kept (its partial sum is not state a
        restart can trust); the clocks say so, and the workers push that step again.
        """
        with self._cond:
            # A closed store still answers: the final checkpoint is taken after the close.
            if not self._ready_now():
                raise NotInitialised("snapshot: the parameters are not initialised yet")
            keys = []
            for slot in self._slots.values():
                clocks = slot.next_step.copy()
                if self.config.mode == "sync":
                    np.minimum(clocks, slot.version, out=clocks)
                state = {name: value.copy() if isinstance(value, np.ndarray) else int(value)
                         for name, value in self._optimizer.state[str(slot.key)].items()}
                keys.append(KeyState(slot.key, slot.value.copy(), slot.version, clocks, state))
            c = self._counters
            counters = {"updates": c.updates, "pushes": c.pushes, "pulls": c.pulls,
                        "dropped_stale": c.dropped_stale,
                        "dropped_gradients": c.dropped_gradients,
                        "skipped_steps": self._skipped_count(),
                        "staleness_hist": list(c.staleness_hist)}
            return Snapshot(self.config.mode, self.config.workers, self._optimizer.config, keys,
                            counters, seq=min(k.version for k in keys))

    def restore(self, snapshot: Snapshot) -> None:
        """Take a snapshot's state; only a store that holds no layout yet can.

        Every worker then rejoins: the store cannot know how far each has got meanwhile.
        """
        with self._cond:
            self._check_open()
            if self._layout is not None:
                raise LayoutConflict("restore: this server already holds parameters")
            if (snapshot.mode, snapshot.workers) != (self.config.mode, self.config.workers):
                raise BadRequest(
                    f"restore: the checkpoint is of a {snapshot.mode} run with "
                    f"{snapshot.workers} workers; this server runs {self.config.mode} with "
                    f"{self.config.workers}")
            layout = tuple(k.key for k in snapshot.keys)
            _check_layout(layout)
            optimizer = Optimizer(snapshot.optimizer, {str(k): (k.size,) for k in layout})
            for ks in snapshot.keys:
                _check_values("restore", ks.key, ks.value)
                if ks.clocks.shape != (self.config.workers,) or ks.version < 0:
                    raise BadRequest(f"restore {ks.key}: clocks of shape {ks.clocks.shape} and "
                                     f"version {ks.version} do not fit {self.config.workers} "
                                     f"workers")
                state = optimizer.state[str(ks.key)]
                if set(state) != set(ks.optimizer):
                    raise BadRequest(f"restore {ks.key}: optimizer state {sorted(ks.optimizer)} "
                                     f"is not {snapshot.optimizer.name}'s {sorted(state)}")
                for name, value in ks.optimizer.items():
                    state[name] = (np.array(value, np.float32, copy=True)
                                   if isinstance(state[name], np.ndarray) else int(value))
            self._layout = layout
            self._optimizer = optimizer
            self._slots = {ks.key.id: _Slot(ks.key, ks.value.astype(np.float32, copy=True),
                                            ks.clocks.astype(np.int64, copy=True), ks.version)
                           for ks in snapshot.keys}
            self._pending_values = 0
            c, saved = self._counters, snapshot.counters
            for name in ("updates", "pushes", "pulls", "dropped_stale", "dropped_gradients"):
                setattr(c, name, int(saved.get(name, 0)))
            c.staleness_hist = [int(n) for n in saved.get("staleness_hist", [])]
            self._skipped_before = int(saved.get("skipped_steps", 0))
            workers = range(self.config.workers)
            self._started = set(workers)
            self._rejoining = set(workers)
            now = self._clock_s()
            self._last_seen = dict.fromkeys(workers, now)
            self._restored_seq = snapshot.seq
            self._cond.notify_all()

    def wait_version(self, target: int, timeout: float) -> bool:
        """Block until every key has at least `target` updates (True), the store closes or
        `timeout` s pass (False). For a checkpointer that writes every N updates."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (self._ready_now() and self._min_version() >= target),
                timeout) and not self._closed

    # -- inspection -----------------------------------------------------------------------

    def was_skipped(self, worker: int, step: int) -> bool:
        """Whether `step` was skipped: sync, by any worker; async and ssp, by `worker`."""
        with self._cond:
            return (step if self.config.mode == "sync" else (worker, step)) in self._skipped

    def layout(self) -> tuple[Key, ...]:
        """The keys this server holds (empty before the first init)."""
        with self._cond:
            return self._layout or ()

    def versions(self) -> tuple[bool, int, int, dict[int, int]]:
        """(initialised, min version, max version, worker -> clock): a cheap check."""
        with self._cond:
            if not self._slots:
                return False, 0, 0, {}
            versions = [s.version for s in self._slots.values()]
            return (self._ready_now(), min(versions), max(versions),
                    {w: self._clock(w) for w in range(self.config.workers)})

    def stats(self) -> dict:
        """Counters and the shape of the shard, as plain values."""
        with self._cond:
            c = self._counters
            hist = list(c.staleness_hist)
            count = sum(hist)
            initialised, vmin, vmax, clocks = self.versions()
            layout = self._layout or ()
            return {
                "mode": self.config.mode,
                "workers": self.config.workers,
                "staleness_bound": self.config.staleness,
                "tensors": sorted({k.name for k in layout}),
                "keys": len(layout),
                "params": sum(k.size for k in layout),
                "bytes_held": 4 * sum(k.size for k in layout),
                "pushes": c.pushes,
                "pulls": c.pulls,
                "updates": c.updates,
                "staleness_count": count,
                "staleness_sum": sum(s * n for s, n in enumerate(hist)),
                "staleness_max": max((s for s, n in enumerate(hist) if n), default=0),
                "staleness_histogram": hist,
                "dropped_stale": c.dropped_stale,
                "dropped_gradients": c.dropped_gradients,
                "skipped_steps": self._skipped_count(),
                "live_workers": sorted(self._live),
                "suspect_workers": self._watch.suspects(),
                "grad_cosine": {w: c for w, (c, _) in self._watch.summary().items()},
                "grad_norm_ratio": {w: r for w, (_, r) in self._watch.summary().items()},
                "restored_from": self._restored_seq,
                "waiting": c.waiting,
                "clocks": clocks,
                "min_version": vmin,
                "max_version": vmax,
                "initialised": initialised,
            }

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_idle(self, timeout: float) -> bool:
        """After close: block until no call waits in the store any more (each has left with
        Closed), at most `timeout` s; True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: self._counters.waiting == 0, timeout)

    def close(self) -> None:
        """Refuse new requests and wake every waiting one (it fails with Closed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- helpers (called with the lock held) ----------------------------------------------

    def _ready_now(self) -> bool:
        return self._layout is not None and self._pending_values == 0

    def _min_version(self) -> int:
        return min(s.version for s in self._slots.values())

    def _skipped_count(self) -> int:
        return self._skipped_before + len(self._skipped)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the server is shutting down")

    def _check_ready(self) -> None:
        self._check_open()
        if self._layout is None or self._pending_values:
            raise NotInitialised(
                "the parameters are not initialised yet"
                + (f" ({self._pending_values} keys without values)" if self._layout else "")
            )

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.config.workers:
            raise BadRequest(
                f"worker {worker} is out of range: this server expects workers "
                f"0..{self.config.workers - 1}"
            )

    def _slot(self, key_id: KeyId, verb: str) -> _Slot:
        slot = self._slots.get(key_id)
        if slot is None:
            raise UnknownKey(f"{verb}: no tensor {key_id[0]!r} starting at element {key_id[1]} "
                             f"on this server")
        return slot

    def _select(self, key_ids: list[KeyId] | None) -> list[_Slot]:
        if key_ids is None:
            return list(self._slots.values())
        return [self._slot(k, "pull") for k in key_ids]

    def _clock(self, worker: int, slots: list[_Slot] | None = None) -> int:
        """Steps of `worker` received in full for `slots` (default: every key here)."""
        slots = self._slots.values() if slots is None else slots
        return min(int(s.next_step[worker]) for s in slots)

    def _min_clock(self, slots: list[_Slot] | None = None) -> int:
        """The slowest live worker's clock (no live worker holds anyone back)."""
        return min((self._clock(w, slots) for w in self._live), default=math.inf)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        """Wait for `predicate` under the lock, at most `timeout` s. With leases, wake now
        and then to remove silent workers: they may be what the wait is waiting for."""
        if predicate():
            return
        tick = None if self.config.lease_s is None else min(1.0, self.config.lease_s / 4)
        deadline = time.monotonic() + timeout
        self._counters.waiting += 1
        try:
            while not (self._closed or predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining if tick is None else min(tick, remaining))
                self._expire_leases()
        finally:
            self._counters.waiting -= 1
            if self._closed:
                self._cond.notify_all()  # wait_idle may be waiting for the last one to leave
        self._check_open()
        if not predicate():
            raise WaitTimeout(f"{what} still waiting after {timeout:.1f} s")


def _check_layout(layout: tuple[Key, ...]) -> None:
    if not layout:
        raise BadRequest("init: the layout has no keys")
    seen: set[KeyId] = set()
    for k in layout:
        total = math.prod(k.tensor_shape)
        if not k.name or not 0 <= k.start < k.stop <= total:
            raise BadRequest(
                f"init: key {k} is not a non-empty range of a tensor of shape {k.tensor_shape}"
            )
        if k.id in seen:
            raise BadRequest(f"init: key {k} appears twice in the layout")
        seen.add(k.id)


def _check_gradient(verb: str, key: Key, grad: np.ndarray | Packed) -> None:
    """_check_values, or for Packed codes the same checks on the codes (half the bytes)."""
    if not isinstance(grad, Packed):
        _check_values(verb, key, grad)
        return
    if grad.codes.shape != (key.size,):
        raise BadRequest(f"{verb} {key}: expected {grad.fmt} ({key.size},), got {grad.fmt} "
                         f"{grad.codes.shape}")
    if not _FINITE[grad.fmt](grad.codes):
        raise BadRequest(f"{verb} {key}: the values hold inf or NaN")


def _check_values(verb: str, key: Key, value: np.ndarray) -> None:
    if value.dtype != np.float32 or value.shape != (key.size,):
        raise BadRequest(
            f"{verb} {key}: expected float32 ({key.size},), got {value.dtype} {value.shape}"
        )
    if not all_finite(value):
        raise BadRequest(f"{verb} {key}: the values hold inf or NaN")
