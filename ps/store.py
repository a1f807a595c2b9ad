"""The store: this server's shard of the parameters, their versions and optimizer state.

It decides, for the consistency mode, when a pushed gradient is applied and when a pull may be
answered, and it counts what happened. It knows nothing of gRPC: the servicer translates.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from kernels import all_finite
from ps.keys import Key, KeyId
from ps.optimizer import Optimizer, OptimizerConfig

__all__ = [
    "MODES", "BadRequest", "Closed", "LayoutConflict", "NotInitialised", "Store",
    "StoreConfig", "StoreError", "StepOutOfRange", "UnknownKey", "WaitTimeout",
]

MODES = ("sync", "async", "ssp")

T = TypeVar("T")
_SKIPPED = object()  # sync: a step's partial sum once any worker has skipped it


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
class StoreConfig:
    mode: str = "sync"  # "sync" | "async" | "ssp"
    workers: int = 1  # how many workers push; sync averages this many gradients per step
    staleness: int = 0  # ssp bound K, in clocks (steps)
    staleness_lr: bool = False  # async/ssp: divide the step size by the gradient's staleness
    max_staleness: int | None = None  # async/ssp: drop (and count) gradients staler than this

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


@dataclass
class _Slot:
    """One key's state: its values, version, per-worker next step, sync partial sums."""

    key: Key
    value: np.ndarray | None  # float32 (size,); None until Init sends values
    next_step: np.ndarray  # int64 (workers,): the step each worker must push next
    version: int = 0  # updates applied
    pending: dict[int, list] = field(default_factory=dict)  # sync: step -> [sum, count]


@dataclass
class _Counters:
    pushes: int = 0
    pulls: int = 0
    updates: int = 0
    dropped_stale: int = 0
    staleness_hist: list[int] = field(default_factory=list)  # [s]: applied with staleness s
    waiting: int = 0


class Store:
    """This server's keys. Every public method is thread-safe and checks before it changes."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._slots: dict[KeyId, _Slot] = {}
        self._layout: tuple[Key, ...] | None = None
        self._optimizer: Optimizer | None = None
        self._pending_values = 0  # keys still without values
        self._counters = _Counters()
        self._started: set[int] = set()  # workers that have asked for step 0
        self._skipped: set = set()  # steps skipped for inf/NaN: sync step, or (worker, step)
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
        ssp: once the slowest worker's clock is at least step - K. Waits at most `timeout` s.

        Without `read`, the values are copies. With it, `read` is called under the lock with
        views of the live values and its result returned: a reader that serialises them makes
        its one copy a consistent snapshot too, instead of copying twice.
        """
        with self._cond:
            self._check_ready()
            slots = self._select(key_ids)
            if step == 0:
                # The start line: a run begins when all W workers have asked for step 0, so
                # that no worker races ahead while the others are still starting up.
                self._check_worker(worker)
                self._started.add(worker)
                self._cond.notify_all()
                self._wait(lambda: len(self._started) == self.config.workers, timeout,
                           f"worker {worker} waiting at the start for "
                           f"{self.config.workers - len(self._started)} more workers")
            if step >= 0 and self.config.mode != "async":
                self._check_worker(worker)
                clock = self._clock(worker, slots)
                if step > clock:
                    raise StepOutOfRange(
                        f"pull: worker {worker} asked for step {step}, but its next step is "
                        f"{clock} (it has pushed {clock} steps)"
                    )
                self._wait(lambda: self._ready(slots, step), timeout,
                           f"pull of step {step} by worker {worker}")
            self._counters.pulls += 1
            if read is None:
                return [(s.key, s.value.copy(), s.version) for s in slots]
            return read([(s.key, s.value, s.version) for s in slots])

    def _ready(self, slots: list[_Slot], step: int) -> bool:
        if self.config.mode == "sync":
            return all(s.version >= step for s in slots)
        # ssp, key by key: every worker has pushed at least step - K steps of these keys.
        return self._min_clock(slots) >= step - self.config.staleness

    # -- push -----------------------------------------------------------------------------

    def push(
        self,
        worker: int,
        step: int,
        grads: dict[KeyId, tuple[np.ndarray, int]],
        scale: float = 1.0,
        skip: bool = False,
    ) -> tuple[int, int, int]:
        """Take worker's gradients for `step`: {key: (gradient, version it was computed from)}.

        `scale`: the gradients are multiplied by a loss scale, divided out here in fp32.
        `skip`: the worker found inf or NaN; its gradients are empty, the step counts, nothing
        is applied (sync: the whole step is skipped by everyone, so that all W workers and
        their loss scalers stay in step).
        Returns (keys accepted, keys already pushed for this step: acknowledged, not applied,
        the largest staleness among the gradients applied now).
        Every check runs first: a refused push changes nothing and uses up no step.
        """
        with self._cond:
            self._check_ready()
            self._check_worker(worker)
            if step < 0:
                raise StepOutOfRange(f"push: step must be >= 0, got {step}")
            if not (math.isfinite(scale) and scale > 0):
                raise BadRequest(f"push: the gradient scale must be finite and > 0, got {scale}")
            fresh = []
            for key_id, (grad, read_version) in grads.items():
                slot = self._slot(key_id, "push")
                if skip:
                    if grad.size:
                        raise BadRequest(f"push {slot.key}: a skipped step carries no values")
                else:
                    _check_values("push", slot.key, grad)
                expected = int(slot.next_step[worker])
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
                    fresh.append((slot, grad, read_version))
            staleness_max = 0
            for slot, grad, read_version in fresh:
                slot.next_step[worker] += 1
                if not skip and scale != 1.0:
                    grad = grad / np.float32(scale)  # unscale in fp32, as GradScaler does
                if self.config.mode == "sync":
                    self._accumulate(slot, step, None if skip else grad)
                elif skip:
                    self._skipped.add((worker, step))
                else:
                    staleness_max = max(staleness_max, self._apply_one(slot, grad, read_version))
            self._counters.pushes += 1
            self._cond.notify_all()
            return len(fresh), len(grads) - len(fresh), staleness_max

    def _accumulate(self, slot: _Slot, step: int, grad: np.ndarray | None) -> None:
        """sync: sum the step's gradients; once all W are in, apply their mean as one update.

        grad None: that worker skipped the step (inf or NaN); then nobody's gradient of the
        step is applied, but the version still advances so that steps and versions stay equal.
        """
        entry = slot.pending.setdefault(step, [None, 0])
        if grad is None:
            entry[0] = _SKIPPED
        elif entry[0] is None:
            entry[0] = np.array(grad, np.float32, copy=True)
        elif entry[0] is not _SKIPPED:
            entry[0] += grad
        entry[1] += 1
        # Steps complete in order: a worker may push step t+1 before the others finish t.
        while (entry := slot.pending.get(slot.version)) and entry[1] == self.config.workers:
            total, count = slot.pending.pop(slot.version)
            if total is _SKIPPED:
                self._skipped.add(slot.version)
            else:
                total /= np.float32(count)
                self._optimizer.step(str(slot.key), slot.value, total)
                self._counters.updates += 1
                self._record_staleness(0, count)
            slot.version += 1

    def _apply_one(self, slot: _Slot, grad: np.ndarray, read_version: int) -> int:
        """async / ssp: apply on arrival, unless staler than allowed. Returns the staleness."""
        staleness = slot.version - read_version
        limit = self.config.max_staleness
        if limit is not None and staleness > limit:
            self._counters.dropped_stale += 1
            return staleness
        lr = None
        if self.config.staleness_lr and staleness > 1:
            lr = self._optimizer.config.lr / staleness  # Zhang et al. 2016
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
            return (self._pending_values == 0, min(versions), max(versions),
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
                "skipped_steps": len(self._skipped),
                "waiting": c.waiting,
                "clocks": clocks,
                "min_version": vmin,
                "max_version": vmax,
                "initialised": initialised,
            }

    def close(self) -> None:
        """Refuse new requests and wake every waiting one (it fails with Closed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- helpers (called with the lock held) ----------------------------------------------

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
        return min(self._clock(w, slots) for w in range(self.config.workers))

    def _wait(self, predicate, timeout: float, what: str) -> None:
        if predicate():
            return
        self._counters.waiting += 1
        try:
            done = self._cond.wait_for(lambda: self._closed or predicate(), timeout)
        finally:
            self._counters.waiting -= 1
        self._check_open()
        if not done:
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


def _check_values(verb: str, key: Key, value: np.ndarray) -> None:
    if value.dtype != np.float32 or value.shape != (key.size,):
        raise BadRequest(
            f"{verb} {key}: expected float32 ({key.size},), got {value.dtype} {value.shape}"
        )
    if not all_finite(value):
        raise BadRequest(f"{verb} {key}: the values hold inf or NaN")
