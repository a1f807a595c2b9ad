"""A shard: the keys this server holds, each with its values, version and clocks, and the
optimizer state beside them. Made by the first init or from a checkpoint's Snapshot, and taken
back into one; its checks raise the store's errors, and run before anything changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from kernels import amax
from ps.gather import Step
from ps.keys import Key, KeyId
from ps.optimizer import Optimizer, OptimizerConfig
from ps.packed import Packed
from ps.snapshot import KeyState, Snapshot
from ps.store_errors import BadRequest, LayoutConflict, StepOutOfRange, UnknownKey

__all__ = ["Fresh", "Shard", "Slot", "check_destinations", "check_gradient", "check_layout",
           "check_values"]


# A gradient new for its step: (key, slot, gradient, version read, max |gradient| or None).
Fresh = tuple[KeyId, "Slot", "np.ndarray | Packed", int, "float | None"]


@dataclass
class Slot:
    """One key's state: its values, version, per-worker next step, sync steps gathering."""

    key: Key
    value: np.ndarray | None  # float32 (size,); None until Init sends values
    next_step: np.ndarray  # int64 (workers,): the step each worker must push next
    version: int = 0  # updates applied
    pending: dict[int, Step] = field(default_factory=dict)  # sync: the steps not yet applied


class Shard:
    """The layout and its slots. Set once per store (init or restore), never replaced."""

    def __init__(self, layout: tuple[Key, ...], optimizer: Optimizer,
                 slots: dict[KeyId, Slot], missing: int) -> None:
        self.layout = layout
        self.optimizer = optimizer
        self.slots = slots
        self.missing = missing  # keys still without values

    @classmethod
    def new(cls, layout: tuple[Key, ...], optimizer: OptimizerConfig, workers: int) -> Shard:
        """A checked layout's keys, all without values yet, at version 0."""
        return cls(layout, Optimizer(optimizer, {str(k): (k.size,) for k in layout}),
                   {k.id: Slot(k, None, np.zeros(workers, np.int64)) for k in layout},
                   len(layout))

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, workers: int) -> Shard:
        """The shard a snapshot holds, checked to fit `workers`; copies of its arrays."""
        layout = tuple(k.key for k in snapshot.keys)
        check_layout(layout)
        optimizer = Optimizer(snapshot.optimizer, {str(k): (k.size,) for k in layout})
        for ks in snapshot.keys:
            check_values("restore", ks.key, ks.value)
            if ks.clocks.shape != (workers,) or ks.version < 0:
                raise BadRequest(f"restore {ks.key}: clocks of shape {ks.clocks.shape} and "
                                 f"version {ks.version} do not fit {workers} workers")
            state = optimizer.state[str(ks.key)]
            if set(state) != set(ks.optimizer):
                raise BadRequest(f"restore {ks.key}: optimizer state {sorted(ks.optimizer)} "
                                 f"is not {snapshot.optimizer.name}'s {sorted(state)}")
            for name, value in ks.optimizer.items():
                state[name] = (np.array(value, np.float32, copy=True)
                               if isinstance(state[name], np.ndarray) else int(value))
        slots = {ks.key.id: Slot(ks.key, ks.value.astype(np.float32, copy=True),
                                 ks.clocks.astype(np.int64, copy=True), ks.version)
                 for ks in snapshot.keys}
        return cls(layout, optimizer, slots, 0)

    def check_same(self, layout: tuple[Key, ...], optimizer: OptimizerConfig) -> None:
        """Refuse a later init whose layout or optimizer differs: two workers disagree about
        the model."""
        if layout != self.layout:
            raise LayoutConflict(
                f"init: this server already holds another layout ({len(self.layout)} keys, "
                f"first {self.layout[0]}); got {len(layout)} keys, first {layout[0]}: do the "
                f"workers build the same model and placement?")
        if optimizer != self.optimizer.config:
            raise LayoutConflict(f"init: optimizer {optimizer} differs from the one already "
                                 f"set ({self.optimizer.config})")

    def fill(self, values: dict[KeyId, np.ndarray]) -> None:
        """Check every value, then take the first values of each key (the first values win)."""
        for key_id, value in values.items():
            if key_id not in self.slots:
                raise UnknownKey(f"init: {key_id[0]!r} at {key_id[1]} is not in the layout")
            check_values("init", self.slots[key_id].key, value)
        for key_id, value in values.items():
            slot = self.slots[key_id]
            if slot.value is None:
                slot.value = np.array(value, dtype=np.float32, copy=True)
                self.missing -= 1

    def check_push(self, worker: int, step: int,
                   grads: dict[KeyId, tuple[np.ndarray | Packed, int]], skip: bool,
                   rejoining: bool) -> list[Fresh]:
        """Check a push of `worker`'s `step` ({key: (gradient, version read)}; `skip`: empty
        gradients) against the keys, changing nothing; return the gradients new for this step
        as (key, slot, gradient, version read, max |gradient| or None for codes). A retried
        step's are acknowledged, not new.
        `rejoining`: the worker's clock may move up to `step`, and the versions it read may
        be ahead of this shard's (a restored one): they count as its own versions."""
        fresh = []
        for key_id, (grad, read_version) in grads.items():
            slot = self.slot(key_id, "push")
            bound = None
            if skip:
                if grad.size:
                    raise BadRequest(f"push {slot.key}: a skipped step carries no values")
            else:
                bound = check_gradient("push", slot.key, grad)
            expected = int(slot.next_step[worker])
            if rejoining:
                expected = max(expected, step)
                read_version = min(read_version, slot.version)
            if step > expected:
                raise StepOutOfRange(f"push {slot.key}: step {step} is beyond worker {worker}'s "
                                     f"next step {expected}")
            if read_version < 0 or read_version > slot.version:
                raise BadRequest(f"push {slot.key}: computed from version {read_version}, but "
                                 f"the key is at version {slot.version}")
            if step == expected:
                fresh.append((key_id, slot, grad, read_version, bound))
        return fresh

    def slot(self, key_id: KeyId, verb: str) -> Slot:
        slot = self.slots.get(key_id)
        if slot is None:
            raise UnknownKey(f"{verb}: no tensor {key_id[0]!r} starting at element {key_id[1]} "
                             f"on this server")
        return slot

    def select(self, key_ids: list[KeyId] | None) -> list[Slot]:
        """The slots of `key_ids` (None: all of them), for a pull."""
        if key_ids is None:
            return list(self.slots.values())
        return [self.slot(k, "pull") for k in key_ids]

    def min_version(self) -> int:
        return min(s.version for s in self.slots.values())

    def key_states(self, clocks: Callable[[Slot], np.ndarray]) -> list[KeyState]:
        """Copies of every key's state, with the clocks that `clocks(slot)` gives."""
        keys = []
        for slot in self.slots.values():
            state = {name: value.copy() if isinstance(value, np.ndarray) else int(value)
                     for name, value in self.optimizer.state[str(slot.key)].items()}
            keys.append(KeyState(slot.key, slot.value.copy(), slot.version, clocks(slot), state))
        return keys


def check_layout(layout: tuple[Key, ...]) -> None:
    """A layout is whole before anything is made of it: named keys, each a non-empty range
    inside its tensor, one shape per tensor name, no two keys overlapping."""
    if not layout:
        raise BadRequest("init: the layout has no keys")
    first: dict[str, Key] = {}  # tensor name -> its first key, whose shape the others share
    for k in layout:
        if not k.name:
            raise BadRequest(f"init: key {k} has no tensor name")
        if any(d < 0 for d in k.tensor_shape):
            raise BadRequest(f"init: key {k}: the tensor shape {k.tensor_shape} has a negative "
                             f"dimension")
        total = math.prod(k.tensor_shape)
        if not 0 <= k.start < k.stop <= total:
            raise BadRequest(f"init: key {k} is not a non-empty range of a tensor of shape "
                             f"{k.tensor_shape} ({total} elements)")
        other = first.setdefault(k.name, k)
        if other.tensor_shape != k.tensor_shape:
            raise BadRequest(f"init: keys {other} and {k} give tensor {k.name!r} two shapes, "
                             f"{other.tensor_shape} and {k.tensor_shape}")
    ordered = sorted(layout, key=lambda k: (k.name, k.start, k.stop))
    for a, b in pairwise(ordered):
        if a.name == b.name and b.start < a.stop:
            raise BadRequest(f"init: key {a} appears twice in the layout" if a == b else
                             f"init: keys {a} and {b} overlap: each element belongs to one key")


def check_gradient(verb: str, key: Key, grad: np.ndarray | Packed) -> float | None:
    """check_values, or for Packed codes the same checks on the codes (half the bytes); the
    largest |value| of a float32 gradient (None for codes), found by the same pass."""
    if not isinstance(grad, Packed):
        return check_values(verb, key, grad)
    if grad.codes.shape != (key.size,):
        raise BadRequest(f"{verb} {key}: expected {grad.fmt} ({key.size},), got {grad.fmt} "
                         f"{grad.codes.shape}")
    if not grad.all_finite():
        raise BadRequest(f"{verb} {key}: the values hold inf or NaN")
    return None


def check_values(verb: str, key: Key, value: np.ndarray) -> float:
    """Refuse values of the wrong dtype or shape, or holding inf or NaN; their largest |x|."""
    if value.dtype != np.float32 or value.shape != (key.size,):
        raise BadRequest(
            f"{verb} {key}: expected float32 ({key.size},), got {value.dtype} {value.shape}"
        )
    largest = amax(value)  # inf or NaN among them makes it inf or NaN
    if not largest < math.inf:
        raise BadRequest(f"{verb} {key}: the values hold inf or NaN")
    return largest


def check_destinations(slots: list[Slot], out: Mapping[KeyId, np.ndarray | Packed]) -> None:
    """Every key has a destination of its size and a format the store can write."""
    for s in slots:
        dest = out.get(s.key.id)
        if dest is None:
            raise BadRequest(f"pull {s.key}: no destination for its values")
        array = dest.codes if isinstance(dest, Packed) else dest
        if array.size != s.key.size or not (isinstance(dest, Packed)
                                             or array.dtype == np.float32):
            raise BadRequest(f"pull {s.key}: a destination of {s.key.size} float32 values or "
                             f"16-bit codes is needed, got {array.dtype} ({array.size},)")
