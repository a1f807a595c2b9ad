"""The store's refusals: one class per kind of problem, each message naming the input.

The servicer maps each class to one gRPC status code, in one table (ps/service.py).
"""

from __future__ import annotations

__all__ = [
    "BadRequest", "Closed", "LayoutConflict", "NotInitialised", "ResourceExhausted",
    "StepOutOfRange", "StoreError", "UnknownKey", "WaitTimeout",
]


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


class ResourceExhausted(StoreError):
    """More than the server allows: a layout over the memory budget, or a worker's calls that
    wait beyond its share of the handler threads."""
