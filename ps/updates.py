"""Updates: what becomes of a checked gradient, as the consistency rule says: gathered into its
step and applied with the others once the step is complete (sync), or applied alone on arrival
(async, ssp); and the counters of what happened. Called by the store with its lock held.
"""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np

from kernels import all_finite, amax
from ps.consistency import EVERY_WORKER, Arrival, Rule
from ps.gather import Gather, Step
from ps.keys import KeyId
from ps.packed import Packed
from ps.shard import Fresh, Shard, Slot
from ps.store_errors import BadRequest
from ps.watch import GradientWatch

__all__ = ["GRAD_SCALE_MAX", "GRAD_SCALE_MIN", "Counters", "Ready", "Updates", "check_scale"]

# The loss scales a push may carry. A scale is a power of two that a loss scaler moved
# (torch's GradScaler starts at 2**16, halves on overflow, doubles after 2000 good steps).
# Below 2**-24 (fp16's smallest subnormal) the scaler has backed off through 40 overflows in a
# row, and dividing by it would make ordinary gradients huge; 1e-300 is 0 in float32, and a
# division by it makes every gradient inf. Above 2**64 no scaler gets: fp16 gradients overflow
# at 65504 long before. A skipped push divides nothing, and only needs a scale > 0.
GRAD_SCALE_MIN = 2.0**-24
GRAD_SCALE_MAX = 2.0**64
_WIDEN = 1 + 2.0**-20  # a bound divided by the scale, widened past the division's rounding

@dataclass
class Ready:
    """A fresh gradient of a push, ready for its update."""

    key_id: KeyId
    slot: Slot
    grad: np.ndarray | Packed  # unscaled, unless Packed codes (their update unscales them)
    read_version: int
    owned: bool  # the array is the store's to keep
    bound: float | None = None  # max |grad| (at least), once known


def check_scale(scale: float, skip: bool) -> None:
    """Refuse a loss scale outside the bounds (any scale not finite and > 0)."""
    if not (math.isfinite(scale) and scale > 0):
        raise BadRequest(f"push: the gradient scale must be finite and > 0, got {scale}")
    if not skip and not GRAD_SCALE_MIN <= scale <= GRAD_SCALE_MAX:
        raise BadRequest(f"push: grad_scale {scale:g} is outside [2**-24, 2**64] (the loss "
                         f"scales a scaler can reach); the gradients were not applied")


@dataclass
class Counters:
    pushes: int = 0
    pulls: int = 0
    updates: int = 0
    dropped_stale: int = 0
    dropped_gradients: int = 0  # sync: worker-steps that came after their step was applied
    staleness_hist: list[int] = field(default_factory=list)  # [s]: applied with staleness s
    waiting: int = 0  # calls waiting in the store now

    def as_stats(self) -> dict:
        """The counters as Stats reports them, with the staleness histogram summed up."""
        hist = list(self.staleness_hist)
        return {
            "pushes": self.pushes,
            "pulls": self.pulls,
            "updates": self.updates,
            "staleness_count": sum(hist),
            "staleness_sum": sum(s * n for s, n in enumerate(hist)),
            "staleness_max": max((s for s, n in enumerate(hist) if n), default=0),
            "staleness_histogram": hist,
            "dropped_stale": self.dropped_stale,
            "dropped_gradients": self.dropped_gradients,
            "waiting": self.waiting,
        }

    def record_staleness(self, staleness: int, count: int) -> None:
        hist = self.staleness_hist
        if len(hist) <= staleness:
            hist.extend([0] * (staleness + 1 - len(hist)))
        hist[staleness] += count


_SAVED = ("updates", "pushes", "pulls", "dropped_stale", "dropped_gradients")  # and see saved


class Updates:
    """Applies the checked gradients of pushes to a shard's keys, and counts."""

    def __init__(self, rule: Rule, gather: Gather, max_staleness: int | None = None,
                 staleness_lr: bool = False, updates_per_step: int = 1) -> None:
        self.rule = rule
        self.gather = gather  # sync: when a step is complete, how its gradients combine
        self.max_staleness = max_staleness  # drop (and count) gradients staler than this
        self.staleness_lr = staleness_lr  # divide the step size by the gradient's staleness
        # Updates a key takes per worker step (sync 1; async and ssp: one per worker's push):
        # with the planned steps, the run's total updates that a schedule may end at.
        self.updates_per_step = updates_per_step
        self.counters = Counters()
        # Steps skipped for inf/NaN, each as the rule marks it, (worker, step), so that a
        # lookup asks the same rule; a sync step skipped for all is (EVERY_WORKER, step).
        self.skipped: set[tuple[int, int]] = set()
        self.skipped_before = 0  # steps skipped before the checkpoint restored from
        self.watch = GradientWatch()  # sync: per-worker gradient statistics, for suspects
        self._last_dropped: dict[int, int] = {}  # worker -> its latest step dropped as late

    def saved(self) -> dict[str, int | list[int]]:
        """The counters a checkpoint carries across a restart, so that a run's totals do not
        restart at zero with the server."""
        c = self.counters
        saved: dict[str, int | list[int]] = {name: getattr(c, name) for name in _SAVED}
        saved.update(skipped_steps=self.skipped_count(), staleness_hist=list(c.staleness_hist))
        return saved

    def load(self, saved: dict[str, int | list[int]]) -> None:
        """Take the counters of a checkpoint (see saved)."""
        c = self.counters
        for name in _SAVED:
            setattr(c, name, int(saved.get(name, 0)))
        c.staleness_hist = [int(n) for n in saved.get("staleness_hist", [])]
        self.skipped_before = int(saved.get("skipped_steps", 0))

    def stats(self) -> dict:
        """The counters, skipped steps and the gradient watch, as Stats reports them."""
        watch = self.watch.summary()
        return {**self.counters.as_stats(), "skipped_steps": self.skipped_count(),
                "suspect_workers": self.watch.suspects(),
                "grad_cosine": {w: cos for w, (cos, _) in watch.items()},
                "grad_norm_ratio": {w: ratio for w, (_, ratio) in watch.items()}}

    def was_skipped(self, worker: int, step: int) -> bool:
        return self.rule.skip_mark(worker, step) in self.skipped

    def skipped_count(self) -> int:
        return self.skipped_before + len(self.skipped)

    def unpack(self, grads: dict[KeyId, tuple[np.ndarray | Packed, int]], skip: bool,
               shard: Shard | None) -> tuple[dict[KeyId, tuple[np.ndarray | Packed, int]],
                                             set[KeyId]]:
        """The gradients with Packed ones decoded to float32, unless the update reads codes
        itself (applied alone, by an optimizer that fuses them: plain SGD); and the keys
        decoded here (new arrays: the store's to keep).

        The store calls it before it takes its lock, so that other pushes need not wait for
        the decoding: a shard is set once (init, restore) and never replaced, so reading it
        unlocked is safe; before it is set (None) everything is decoded, and the push is then
        refused.
        """
        fused = (not skip and not self.rule.gathers and shard is not None
                 and shard.optimizer.fuses_codes)
        if fused or not any(isinstance(grad, Packed) for grad, _ in grads.values()):
            return grads, set()  # float32 pushes (most of them) pass as they came
        out, decoded = {}, set()
        for key_id, (grad, read_version) in grads.items():
            if isinstance(grad, Packed):
                grad = grad.decode()
                decoded.add(key_id)
            out[key_id] = (grad, read_version)
        return out, decoded

    def unscale(self, fresh: list[Fresh], scale: float, skip: bool, owned: bool,
                decoded: set[KeyId]) -> list[Ready]:
        """The fresh gradients of a push (see Shard.check_push) ready for their update: float32
        ones divided by the loss scale in fp32, as GradScaler does (a new array, the store's
        to keep); Packed codes are unscaled by the update itself, in the same pass. `owned`,
        or the key in `decoded`: the array is the store's to keep, without a copy."""
        ready = []
        for key_id, slot, grad, read_version, bound in fresh:
            owned_here = owned or key_id in decoded
            if not skip and scale != 1.0 and not isinstance(grad, Packed):
                with np.errstate(over="ignore"):  # an inf here is refused by check_finite
                    grad = grad / np.float32(scale)
                owned_here = True
                bound = None if bound is None else bound / float(np.float32(scale)) * _WIDEN
            ready.append(Ready(key_id, slot, grad, read_version, owned_here,
                               None if isinstance(grad, Packed) else bound))
        return ready

    def check_finite(self, shard: Shard, step: int, ready: list[Ready], scale: float,
                     skip: bool) -> None:
        """A rule that applies on arrival (async, ssp): refuse the whole push, changing
        nothing, if the update of any of its keys would make a weight or the optimizer's
        state inf or NaN (each computed as it would be, nothing written). A rule that
        gathers checks each step's combined update instead (advance)."""
        if skip or self.rule.gathers:
            return
        for item in ready:
            slot, grad = item.slot, item.grad
            dropped, lr = self._staleness(shard, slot, item.read_version)
            if item.bound is None and not isinstance(grad, Packed):
                item.bound = amax(grad)  # measured once, for this check and the update
            if dropped or self._update(shard, slot, grad, lr, scale, item.bound, dry_run=True):
                continue
            if isinstance(grad, Packed) or all_finite(grad):
                cause = (f"{shard.optimizer.config.name} with lr {lr:g} would take a "
                         f"weight or its optimizer state past float32's range")
            else:
                cause = f"the gradient divided by grad_scale {scale:g} overflows float32"
            raise BadRequest(f"push {slot.key}: the update would make weights non-finite: "
                             f"{cause}; nothing of this push was applied, and worker step "
                             f"{step} may be sent again")

    def take(self, shard: Shard, live: Set[int], worker: int, step: int, ready: list[Ready],
             scale: float, skip: bool) -> int:
        """Apply or gather the gradients of one push of `worker`'s `step`, ready (unscale) and
        checked (check_finite); the largest staleness applied. `scale`: the loss scale still
        in Packed codes; `skip`: the step is skipped (no values)."""
        staleness_max = 0
        late = False
        for item in ready:
            slot, grad = item.slot, item.grad
            slot.next_step[worker] += 1
            arrival = self.rule.arrival(step, slot.version)
            if arrival is Arrival.GATHER:
                slot.pending.setdefault(step, Step()).add(worker, None if skip else grad,
                                                           item.owned, item.bound)
                self.advance(shard, slot, live)
            elif arrival is Arrival.LATE:
                late = True  # the step was applied without it (backup workers, rejoin)
            elif skip:
                self.skipped.add(self.rule.skip_mark(worker, step))
            else:
                staleness_max = max(staleness_max, self._apply_one(
                    shard, slot, grad, item.read_version, scale, item.bound))
        if late and self._last_dropped.get(worker) != step:
            self._last_dropped[worker] = step  # a step's requests to this server count once
            self.counters.dropped_gradients += 1
        return staleness_max

    def advance(self, shard: Shard, slot: Slot, live: Set[int]) -> None:
        """Apply the key's complete gathered steps, in order (see Gather.next_complete). A
        skipped step applies nothing, but the version still advances so that steps and
        versions stay equal."""
        while (entry := self.gather.next_complete(slot.pending, slot.version, slot.next_step,
                                                  live)) is not None:
            if entry.skipped_by is not None:
                self.skipped.add(self.rule.skip_mark(entry.skipped_by, slot.version))
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # inf: skipped just below
                    update = self.gather.combine(entry, slot.key, slot.version)
                self.watch.observe(entry.grads)
                if shard.optimizer.step(str(slot.key), slot.value, update,
                                        lr=self._scheduled(shard, slot), keep_finite=True,
                                        grad_bound=self.gather.combined_bound(entry)):
                    self.counters.updates += 1
                    self.counters.record_staleness(0, len(entry.workers))
                else:  # it would make the key's values or state non-finite: skipped for all
                    self.skipped.add(self.rule.skip_mark(EVERY_WORKER, slot.version))
            slot.version += 1

    def catch_up(self, shard: Shard | None, live: Set[int]) -> None:
        """In a rule that gathers, after the live set or a clock changed: apply the steps now
        complete; and a key whose every live worker is past its version (a restored store,
        rejoined by workers that are further on) jumps ahead to them, its unfinished steps
        dropped."""
        if not self.rule.gathers or not live or shard is None:
            return
        for slot in shard.slots.values():
            self.advance(shard, slot, live)
            target = min(int(slot.next_step[w]) for w in live)
            if target > slot.version:
                for old in [t for t in slot.pending if t < target]:
                    del slot.pending[old]
                slot.version = target
                self.advance(shard, slot, live)

    def _scheduled(self, shard: Shard, slot: Slot) -> float:
        """The step size of the key's next update: the schedule's at the key's version (the
        updates applied to it, a skipped sync step counted as one, as its version is)."""
        return shard.optimizer.config.lr_at(slot.version, self.updates_per_step)

    def _staleness(self, shard: Shard, slot: Slot, read_version: int) -> tuple[bool, float]:
        """Whether a gradient read at `read_version` is dropped as too stale, and its step
        size: the schedule's, divided by the staleness if staleness_lr."""
        staleness = slot.version - read_version
        lr = self._scheduled(shard, slot)
        if self.max_staleness is not None and staleness > self.max_staleness:
            return True, lr
        if self.staleness_lr and staleness > 1:
            return False, lr / staleness  # Zhang et al. 2016
        return False, lr

    @staticmethod
    def _update(shard: Shard, slot: Slot, grad: np.ndarray | Packed, lr: float,
                scale: float, bound: float | None, dry_run: bool = False) -> bool:
        optimizer = shard.optimizer
        # The codes were checked finite with the push (Shard.check_push).
        if isinstance(grad, Packed):  # decoded, unscaled and applied in one pass
            return optimizer.step_codes(str(slot.key), slot.value, grad.codes, grad.fmt, scale,
                                        lr=lr, keep_finite=True, dry_run=dry_run,
                                        codes_finite=True)
        return optimizer.step(str(slot.key), slot.value, grad, lr=lr, keep_finite=True,
                              dry_run=dry_run, grad_bound=bound)

    def _apply_one(self, shard: Shard, slot: Slot, grad: np.ndarray | Packed,
                   read_version: int, scale: float, bound: float | None) -> int:
        """Apply on arrival (checked by check_finite), unless staler than allowed. Returns the
        staleness. `scale`: the loss scale still in Packed codes (a float32 gradient is
        unscaled)."""
        staleness = slot.version - read_version
        dropped, lr = self._staleness(shard, slot, read_version)
        if dropped:
            self.counters.dropped_stale += 1
            return staleness
        self._update(shard, slot, grad, lr, scale, bound)
        slot.version += 1
        self.counters.updates += 1
        self.counters.record_staleness(staleness, 1)
        return staleness
