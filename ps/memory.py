"""Memory for MiB-sized messages: buffers kept for reuse, and bytes written in place.

Every pull and push allocates MiB-sized buffers. glibc's malloc gives each large one fresh
pages from the kernel and returns them on free, so every message pays for page faults (in a
virtual machine, more than the copy itself). Raising the two thresholds below keeps freed
buffers in the heap for reuse. Called once at the edge of each process that moves tensors.

gRPC sends only `bytes`, which Python builds by copying finished data; `filled_bytes` lets an
encoder write a message's tensor straight into its bytes instead, saving a pass over it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import numpy as np

__all__ = ["filled_bytes", "keep_freed_buffers"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 256 * 1024 * 1024  # allocations below this come from the reusable heap
_TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap memory kept before giving it back


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc for MiB-sized messages; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): nothing to tune
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


# CPython's C API makes a bytes object of n uninitialised bytes, for its maker to fill before
# anyone else sees it (PyBytes_FromStringAndSize(NULL, n)); its data starts where an empty
# bytes object's terminating NUL sits.
_IN_PLACE = sys.implementation.name == "cpython"
if _IN_PLACE:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _BYTES_DATA = sys.getsizeof(b"") - 1


def filled_bytes(size: int, fill: Callable[[np.ndarray], None]) -> bytes:
    """A new bytes object of `size` bytes, written by fill(view), where view is a writable
    uint8 array over them. Only `fill` ever sees them writable: the view must not outlive it.
    """
    if size < 0:
        raise ValueError(f"filled_bytes: size must be >= 0, got {size}")
    if not _IN_PLACE or size == 0:
        buffer = bytearray(size)
        fill(np.frombuffer(buffer, np.uint8))
        return bytes(buffer)  # elsewhere: one more copy, the same bytes
    out = _new_bytes(None, size)
    fill(np.frombuffer((ctypes.c_char * size).from_address(id(out) + _BYTES_DATA), np.uint8))
    return out
