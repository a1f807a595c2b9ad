"""Process memory settings: keep freed MiB-sized buffers for reuse instead of unmapping them.

Every pull and push allocates MiB-sized buffers. glibc's malloc gives each large one fresh
pages from the kernel and returns them on free, so every message pays for page faults (in a
virtual machine, more than the copy itself). Raising the two thresholds below keeps freed
buffers in the heap for reuse. Called once at the edge of each process that moves tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_buffers"]

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
