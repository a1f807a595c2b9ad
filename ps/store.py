"""The store: this server's shard of the parameters, and the verbs that workers call on it.

It asks its consistency rule (ps/consistency.py) when to answer a pull and what to do with a
gradient, and knows nothing of gRPC: the servicer translates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from ps.admission import Admission
from ps.consistency import clock, make_rule
from ps.gather import Gather
from ps.keys import Key, KeyId
from ps.membership import Membership
from ps.optimizer import OptimizerConfig
from ps.packed import Packed, write_values
from ps.shard import Shard, Slot, check_destinations, check_layout
from ps.snapshot import Snapshot
from ps.store_config import StoreConfig
from ps.store_errors import (
    BadRequest,
    Closed,
    LayoutConflict,
    NotInitialised,
    ResourceExhausted,
    StepOutOfRange,
    WaitTimeout,
)
from ps.store_results import InitResult, PullAnswer, Pulled, PushResult, Versions
from ps.updates import Updates, check_scale

__all__ = ["InitResult", "PullAnswer", "Pulled", "PushResult", "Store", "Versions"]


class Store:
    """This server's keys. Every public method is thread-safe and checks before it changes."""

    def __init__(self, config: StoreConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._rule = make_rule(config.mode, config.staleness)
        self._members = Membership(config.workers, config.lease_s, clock)  # clock: for leases
        self._cond = threading.Condition()
        self._shard: Shard | None = None  # set by the first init, or by restore
        # What becomes of a checked gradient, as the rule says; and the counters.
        self._updates = Updates(self._rule, Gather(config.aggregate, config.backup_workers,
                                                   config.dp_noise_std, config.dp_seed),
                                config.max_staleness, config.staleness_lr,
                                updates_per_step=self._rule.updates_per_step(config.workers))
        self._counters = self._updates.counters
        self._restored_seq = -1  # the checkpoint this store was restored from
        self._closed = False
        # The memory budget, and each worker's places for calls that may wait.
        self._admission = Admission(config.memory_budget_mb, config.max_waiting,
                                    config.workers, self._rule.gathers)

    # -- initialisation -------------------------------------------------------------------

    def init(
        self,
        keys: list[Key],
        optimizer: OptimizerConfig,
        values: dict[KeyId, np.ndarray],
    ) -> InitResult:
        """Set the layout (the first call wins) and the first values of keys.

        The layout is checked whole, and weighed against the memory budget, before anything is
        allocated; a refused or failed init leaves the store as it was (no layout set). A
        layout or optimizer that differs from the one set is refused: two workers disagree
        about the model.
        """
        layout = tuple(keys)
        check_layout(layout)
        with self._cond:
            self._check_open()
            created = self._shard is None
            if created:
                self._admission.check_layout(layout, optimizer.name)
                try:
                    shard = Shard.new(layout, optimizer, self.config.workers)
                except MemoryError:
                    raise ResourceExhausted("init: this machine could not allocate the "
                                            "layout; nothing was kept") from None
            else:
                shard = self._shard
                shard.check_same(layout, optimizer)
            try:
                shard.fill(values)  # checks every value first: a refused init changes nothing
            except MemoryError:
                raise ResourceExhausted("init: this machine could not allocate the values "
                                        "sent; nothing was kept") from None
            self._shard = shard
            self._cond.notify_all()
            return InitResult(created, shard.missing)

    # -- pull -----------------------------------------------------------------------------

    def pull(
        self,
        key_ids: list[KeyId] | None,
        worker: int,
        step: int | None,
        timeout: float,
        out: Mapping[KeyId, np.ndarray | Packed] | None = None,
        admitted: bool = False,
    ) -> PullAnswer:
        """The values of `key_ids` (None: all) with their versions, as (key, values, version);
        the answer's `blocked_s` says how long it waited for its rule (and the start line).

        step None: at once, no barrier (a look at the weights). Otherwise `worker` is about to
        compute `step`, and its rule says when to answer (sync: once every key has applied
        `step` updates; ssp: once the slowest live worker's clock is at least step - K; async:
        at once); step 0 first waits at the start line. Waits at most `timeout` s, in one of
        the worker's waiting rooms (see waiting_room; `admitted`: the caller holds one).

        Without `out`, the values are copies. With it (key -> a float32 array of the key's
        size, or Packed codes), each key's values are written there, encoded as the
        destination holds them, and returned as that destination: the one pass over the
        values that a reply needs, made while no update can change them. Only the store's
        own code runs under its lock.
        """
        if step is not None and not admitted:
            with self.waiting_room(worker):
                return self.pull(key_ids, worker, step, timeout, out, admitted=True)
        with self._cond:
            shard = self._check_ready()
            slots = shard.select(key_ids)
            if out is not None:
                check_destinations(slots, out)
            blocked = 0.0
            if step is not None:
                if step < 0:
                    raise StepOutOfRange(f"pull: step must be >= 0 (or None: at once), got {step}")
                self._check_worker(worker)
                with self._members.calling(worker):
                    self._arrive(worker, step)
                    blocked = self._wait_for_step(slots, worker, step, timeout)
            self._counters.pulls += 1
            if out is None:
                return PullAnswer([Pulled(s.key, s.value.copy(), s.version) for s in slots],
                                  blocked)
            for s in slots:
                write_values(s.value, out[s.key.id])
            return PullAnswer([Pulled(s.key, out[s.key.id], s.version) for s in slots], blocked)

    @contextmanager
    def waiting_room(self, worker: int) -> Iterator[None]:
        """Hold one of `worker`'s config.max_waiting places for a call that may wait (a pull of
        a step, a PushPull). With every place taken, the call is refused at once: waiting
        calls hold a handler thread each, and no worker id may hold more than its share, so
        a barrier's own workers and the control calls always find a thread."""
        with self._cond:
            self._check_open()
            self._check_worker(worker)
            self._admission.enter(worker)
        try:
            yield
        finally:
            with self._cond:
                self._admission.leave(worker)

    def _wait_for_step(self, slots: list[Slot], worker: int, step: int,
                       timeout: float) -> float:
        """Wait until `worker` may compute `step`; the seconds it was held (0.0: not at all)."""
        members = self._members
        blocked = 0.0
        if step == 0:
            # The start line: a run begins when every live worker has asked for step 0, so
            # that no worker races ahead while the others are still starting up.
            members.start(worker)
            self._cond.notify_all()
            blocked += self._wait(members.all_started, timeout,
                                  f"worker {worker} waiting at the start for workers "
                                  f"{members.not_started()}")
        rule = self._rule
        if not rule.waits:
            return blocked
        own = clock(worker, slots)
        if step > own:
            raise StepOutOfRange(
                f"pull: worker {worker} asked for step {step}, but its next step is "
                f"{own} (it has pushed {own} steps)"
            )
        return blocked + self._wait(lambda: rule.ready(step, slots, members.live), timeout,
                                    f"pull of step {step} by worker {worker}")

    # -- push -----------------------------------------------------------------------------

    def push(
        self,
        worker: int,
        step: int,
        grads: dict[KeyId, tuple[np.ndarray | Packed, int]],
        scale: float = 1.0,
        skip: bool = False,
        owned: bool = False,
    ) -> PushResult:
        """Take worker's gradients for `step`: {key: (gradient, version it was computed from)}.

        `scale`: the gradients are multiplied by a loss scale, divided out here in fp32.
        `skip`: the worker found inf or NaN; its gradients are empty, the step counts, nothing
        is applied (sync: the whole step is skipped by everyone, so that all W workers and
        their loss scalers stay in step).
        `owned`: the arrays are the store's to keep (the caller made them for this push and
        will not touch them again), so sync mode keeps them without a copy.
        A gradient may also come as Packed 16-bit codes: they are checked as codes, and
        decoded to float32 unless the update reads the codes itself (see Updates.unpack).
        Every check runs first: a refused push changes nothing and uses up no step.
        """
        grads, decoded = self._updates.unpack(grads, skip, self._shard)
        with self._cond:
            shard = self._check_ready()
            self._check_worker(worker)
            if step < 0:
                raise StepOutOfRange(f"push: step must be >= 0, got {step}")
            check_scale(scale, skip)
            # A rejoining worker was computing while this store lost track of it (see
            # Shard.check_push): its clock may move up.
            fresh = shard.check_push(worker, step, grads, skip,
                                     rejoining=worker in self._members.rejoining)
            ready = self._updates.unscale(fresh, scale, skip, owned, decoded)
            # Weights stay finite: an update that would not is refused whole (async, ssp) or
            # skips its step (sync, see Updates.advance).
            self._updates.check_finite(shard, step, ready, scale, skip)
            with self._members.calling(worker):
                self._arrive(worker, step)
                staleness_max = self._updates.take(shard, self._members.live, worker, step,
                                                   ready, scale, skip)
            self._counters.pushes += 1
            self._cond.notify_all()
            return PushResult(len(fresh), len(grads) - len(fresh), staleness_max)

    # -- workers coming and going ---------------------------------------------------------

    def remove_worker(self, worker: int) -> bool:
        """Stop waiting for `worker` (it died, or its lease expired); False if it was not live.

        Its gradients already gathered stay. If it calls again it rejoins, at its new step.
        """
        with self._cond:
            self._check_worker(worker)
            return self._remove(worker)

    def expire_leases(self) -> list[int]:
        """Remove the live workers silent for longer than the lease; return them."""
        with self._cond:
            return self._expire_leases()

    def start_step(self, worker: int) -> int:
        """The step a (re)starting worker begins at, as the rule says: its own clock, or in
        sync and ssp, where the others are if they are ahead."""
        with self._cond:
            shard = self._check_ready()
            self._check_worker(worker)
            return self._rule.start_step(worker, shard.slots.values(), self._members.live)

    def _remove(self, worker: int) -> bool:
        if not self._members.remove(worker):
            return False
        self._updates.catch_up(self._shard, self._members.live)
        self._cond.notify_all()
        return True

    def _expire_leases(self) -> list[int]:
        expired = self._members.silent()
        for w in expired:
            self._remove(w)
        return expired

    def _arrive(self, worker: int, step: int) -> None:
        """A call of `worker` at `step`: a rejoining worker is live again, at that step."""
        if not self._members.rejoin(worker):
            return
        for slot in self._shard.slots.values():
            slot.next_step[worker] = max(int(slot.next_step[worker]), step)
        self._updates.catch_up(self._shard, self._members.live)
        self._cond.notify_all()

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This shard's state now, copied: what a checkpoint writes, with the clocks as the
        rule records them (sync: a step still gathering is not kept; its workers push it
        again)."""
        with self._cond:
            # A closed store still answers: the final checkpoint is taken after the close.
            if not self._ready_now():
                raise NotInitialised("snapshot: the parameters are not initialised yet")
            keys = self._shard.key_states(self._rule.snapshot_clocks)
            return Snapshot(self.config.mode, self.config.workers, self._shard.optimizer.config,
                            keys, self._updates.saved(), seq=min(k.version for k in keys))

    def restore(self, snapshot: Snapshot) -> None:
        """Take a snapshot's state; only a store that holds no layout yet can.

        Every worker then rejoins: the store cannot know how far each has got meanwhile.
        """
        with self._cond:
            self._check_open()
            if self._shard is not None:
                raise LayoutConflict("restore: this server already holds parameters")
            if (snapshot.mode, snapshot.workers) != (self.config.mode, self.config.workers):
                raise BadRequest(
                    f"restore: the checkpoint is of a {snapshot.mode} run with "
                    f"{snapshot.workers} workers; this server runs {self.config.mode} with "
                    f"{self.config.workers}")
            self._shard = Shard.from_snapshot(snapshot, self.config.workers)
            self._updates.load(snapshot.counters)
            self._members.restored()
            self._restored_seq = snapshot.seq
            self._cond.notify_all()

    def wait_version(self, target: int, timeout: float) -> bool:
        """Block until every key has at least `target` updates (True), the store closes or
        `timeout` s pass (False). For a checkpointer that writes every N updates."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (self._ready_now()
                                         and self._shard.min_version() >= target),
                timeout) and not self._closed

    # -- inspection -----------------------------------------------------------------------

    def was_skipped(self, worker: int, step: int) -> bool:
        """Whether `worker`'s `step` was skipped (sync: by any worker; async, ssp: by it)."""
        with self._cond:
            return self._updates.was_skipped(worker, step)

    def layout(self) -> tuple[Key, ...]:
        """The keys this server holds (empty before the first init)."""
        with self._cond:
            return self._shard.layout if self._shard else ()

    def key_versions(self, key_ids: list[KeyId] | None) -> list[int]:
        """The versions of `key_ids` (None: all) now: a look, without waiting."""
        with self._cond:
            return [s.version for s in self._check_ready().select(key_ids)]

    def versions(self) -> Versions:
        """Whether initialised, the min and max version, and each worker's clock: a cheap
        check."""
        with self._cond:
            if self._shard is None:
                return Versions(False, 0, 0, {})
            slots = self._shard.slots.values()
            versions = [s.version for s in slots]
            return Versions(self._ready_now(), min(versions), max(versions),
                            {w: clock(w, slots) for w in range(self.config.workers)})

    def stats(self) -> dict:
        """Counters and the shape of the shard, as plain values."""
        with self._cond:
            initialised, vmin, vmax, clocks = self.versions()
            layout = self._shard.layout if self._shard else ()
            return {
                "mode": self.config.mode,
                "workers": self.config.workers,
                "staleness_bound": self.config.staleness,
                "tensors": sorted({k.name for k in layout}),
                "keys": len(layout),
                "params": sum(k.size for k in layout),
                "bytes_held": 4 * sum(k.size for k in layout),
                **self._updates.stats(),
                "live_workers": sorted(self._members.live),
                "restored_from": self._restored_seq,
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
        return self._shard is not None and self._shard.missing == 0

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the server is shutting down")

    def _check_ready(self) -> Shard:
        self._check_open()
        shard = self._shard
        if shard is None or shard.missing:
            raise NotInitialised(
                "the parameters are not initialised yet"
                + (f" ({shard.missing} keys without values)" if shard else "")
            )
        return shard

    def _check_worker(self, worker: int) -> None:
        if not 0 <= worker < self.config.workers:
            raise BadRequest(
                f"worker {worker} is out of range: this server expects workers "
                f"0..{self.config.workers - 1}"
            )

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Wait for `predicate` under the lock, at most `timeout` s; the seconds waited (0.0
        if it held at once: workers report this as blocked time). With leases, wake now
        and then to remove silent workers: they may be what the wait is waiting for."""
        if predicate():
            return 0.0
        tick = None if self.config.lease_s is None else min(1.0, self.config.lease_s / 4)
        began = time.monotonic()
        deadline = began + timeout
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
        return time.monotonic() - began

