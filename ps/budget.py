"""The memory budget: the bytes a layout needs on a server, and how many it may have.

Init weighs a layout against the budget before anything is allocated (ps/store.py), so that
a layout the machine cannot hold is refused with RESOURCE_EXHAUSTED, not half made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ps.keys import Key

__all__ = ["DEFAULT_FRACTION", "KEY_BYTES", "budget_bytes", "layout_bytes", "machine_bytes"]

# Without a budget set, a server may hold this fraction of the machine's physical memory:
# enough for any model the machine can train, while a layout that would swap or be killed by
# the OOM killer is refused up front. Several servers on one machine share it: set the flag.
DEFAULT_FRACTION = 0.5
FALLBACK_BYTES = 4 * 2**30  # where the OS does not tell its memory size
KEY_BYTES = 1024  # a key's own objects (slot, clocks, dict entries), roughly, measured
# float32 optimizer state per element
_STATE_FLOATS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def machine_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def budget_bytes(memory_budget_mb: int | None) -> int:
    """The budget in bytes: the setting's MiB, or by default a fraction of physical memory."""
    if memory_budget_mb is not None:
        return int(memory_budget_mb) * 2**20
    total = machine_bytes()
    return int(total * DEFAULT_FRACTION) if total else FALLBACK_BYTES


def layout_bytes(layout: Sequence[Key], optimizer: str, workers: int,
                 gathers: bool) -> tuple[int, str]:
    """The bytes a layout needs, and what they are, as a phrase for a message: per element the
    float32 value and optimizer state, and where a step is gathered (sync) one gradient per
    worker and their combination; and each key's own objects."""
    elements = sum(k.size for k in layout)
    per_element = 4 * (1 + _STATE_FLOATS[optimizer] + (workers + 1 if gathers else 0))
    parts = (["values"] + ([f"{optimizer} state"] if _STATE_FLOATS[optimizer] else [])
             + (["sync's gathered gradients"] if gathers else []))
    need = per_element * elements + KEY_BYTES * len(layout)
    return need, (f"{elements} elements x {per_element} bytes ({', '.join(parts)}) and "
                  f"{len(layout)} key(s) x {KEY_BYTES} bytes")
