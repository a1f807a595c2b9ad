"""The store's answers, as plain tuples: what an init did, a key pulled, what a push did, and
the versions and clocks (ps/store.py makes them; the servicer reads them).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ps.keys import Key
from ps.packed import Packed

__all__ = ["InitResult", "Pulled", "PullAnswer", "PushResult", "Versions"]


class InitResult(NamedTuple):
    created: bool  # this call set the layout
    pending: int  # keys still without values


class Pulled(NamedTuple):
    """One key of a pull: its values (a copy, or the destination they were written to) and
    the version they are."""

    key: Key
    values: np.ndarray | Packed
    version: int


class PullAnswer(list):
    """A pull's keys (a list of Pulled, in the order asked), and how long the pull was held
    at a barrier or the staleness bound before it could be answered."""

    def __init__(self, pulled: list[Pulled], blocked_s: float = 0.0) -> None:
        super().__init__(pulled)
        self.blocked_s = blocked_s  # seconds; 0.0 exactly when the pull did not wait


class PushResult(NamedTuple):
    accepted: int  # keys taken for this step
    duplicates: int  # keys already pushed for this step (a retry): acknowledged, not applied
    staleness_max: int  # the largest staleness among the gradients applied by this push


class Versions(NamedTuple):
    initialised: bool  # every key has values
    min_version: int
    max_version: int
    clocks: dict[int, int]  # worker -> its clock (steps pushed to every key here)
