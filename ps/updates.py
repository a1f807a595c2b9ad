"""Updates: what becomes of a checked gradient, as the consistency rule says: gathered into its
step and applied with the others once the step is complete (sync), or applied alone on arrival
(async, ssp); and the counters of what happened. Called by the store with its lock held.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

import numpy as np

from ps.consistency import Arrival, Rule
from ps.gather import Gather, Step
from ps.keys import KeyId
from ps.packed import Packed
from ps.shard import Shard, Slot
from ps.watch import GradientWatch

__all__ = ["Counters", "Updates"]


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
                 staleness_lr: bool = False) -> None:
        self.rule = rule
        self.gather = gather  # sync: when a step is complete, how its gradients combine
        self.max_staleness = max_staleness  # drop (and count) gradients staler than this
        self.staleness_lr = staleness_lr  # divide the step size by the gradient's staleness
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

    def take(self, shard: Shard, live: Set[int], worker: int, step: int, fresh: list,
             scale: float, skip: bool, owned: bool, decoded: set[KeyId]) -> int:
        """Apply or gather the checked gradients of one push of `worker`'s `step`; the largest
        staleness applied. `fresh`: (key, slot, gradient, version read), see
        Shard.check_push. `scale`: the loss scale; `skip`: the step is skipped (no values).
        `owned`, or the key in `decoded`: the array is the store's to keep, without a copy."""
        staleness_max = 0
        late = False
        for key_id, slot, grad, read_version in fresh:
            owned_here = owned or key_id in decoded
            slot.next_step[worker] += 1
            # Packed codes are unscaled by the update itself, in the same pass.
            if not skip and scale != 1.0 and not isinstance(grad, Packed):
                grad = grad / np.float32(scale)  # unscale in fp32, as GradScaler does: a new
                owned_here = True  # array, ours to keep
            arrival = self.rule.arrival(step, slot.version)
            if arrival is Arrival.GATHER:
                slot.pending.setdefault(step, Step()).add(worker, None if skip else grad,
                                                           owned_here)
                self.advance(shard, slot, live)
            elif arrival is Arrival.LATE:
                late = True  # the step was applied without it (backup workers, rejoin)
            elif skip:
                self.skipped.add(self.rule.skip_mark(worker, step))
            else:
                staleness_max = max(staleness_max,
                                    self._apply_one(shard, slot, grad, read_version, scale))
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
                update = self.gather.combine(entry, slot.key, slot.version)
                self.watch.observe(entry.grads)
                shard.optimizer.step(str(slot.key), slot.value, update)
                self.counters.updates += 1
                self.counters.record_staleness(0, len(entry.workers))
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

    def _apply_one(self, shard: Shard, slot: Slot, grad: np.ndarray | Packed,
                   read_version: int, scale: float) -> int:
        """Apply on arrival, unless staler than allowed. Returns the staleness.
        `scale`: the loss scale still in Packed codes (a float32 gradient is unscaled)."""
        staleness = slot.version - read_version
        if self.max_staleness is not None and staleness > self.max_staleness:
            self.counters.dropped_stale += 1
            return staleness
        lr = None
        optimizer = shard.optimizer
        if self.staleness_lr and staleness > 1:
            lr = optimizer.config.lr / staleness  # Zhang et al. 2016
        if isinstance(grad, Packed):  # decoded, unscaled and applied in one pass
            optimizer.step_codes(str(slot.key), slot.value, grad.codes, grad.fmt, scale, lr=lr)
        else:
            optimizer.step(str(slot.key), slot.value, grad, lr=lr)
        slot.version += 1
        self.counters.updates += 1
        self.counters.record_staleness(staleness, 1)
        return staleness
