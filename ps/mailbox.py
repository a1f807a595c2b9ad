"""Shared-memory mailboxes: tensors between a worker and a server on one host, off the socket.

A worker creates a file in /dev/shm with two halves, gradients going up and weights coming
down; both processes map it, and messages then carry byte offsets instead of bytes. A MiB
tensor costs one copy on each side instead of gRPC's copies through the kernel's socket
buffers (TensorPipe's shared-memory channel does the same for PyTorch RPC). The worker removes
the file's name as soon as the server has mapped it: the memory lives while either process
maps it, and nothing is left behind in /dev/shm when they die.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
from pathlib import Path

import numpy as np

__all__ = ["MAILBOX_LOST", "REASON_KEY", "SHM_DIR", "Mailbox", "MailboxError", "MailboxLost",
           "MailboxMissing"]

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"tinyps-[0-9a-f]{32}")
_MAX_SIZE = 1 << 40  # bytes per half: far beyond any model, and a bound on a bad request


class MailboxError(ValueError):
    """A mailbox request that can never work: a malformed name or size, an offset outside."""


# A refused call says why in a form a program reads, beside its status code: gRPC trailing
# metadata under REASON_KEY, and the same pair in the local channel's reply frame. Clients decide
# on the reason, never on the words of the details.
REASON_KEY = "tinyps-reason"
MAILBOX_LOST = "mailbox-lost"  # the server has no mailbox of the caller's: attach again


class MailboxMissing(RuntimeError):
    """The file is not there to open: the server is on another host. Send bytes instead."""


class MailboxLost(MailboxMissing):
    """A shared request names a mailbox the server has not got (it restarted, or a newer Attach
    replaced it): the worker attaches again. Travels with the reason MAILBOX_LOST."""

    reason = MAILBOX_LOST


class Mailbox:
    """A mapped mailbox of two halves of `size` bytes: gradients, then weights."""

    def __init__(self, memory: mmap.mmap, path: Path, size: int) -> None:
        self._memory = memory
        self.path = path
        self.name = path.name
        self.size = size

    @classmethod
    def create(cls, size: int, directory: Path = SHM_DIR) -> Mailbox:
        """A new mailbox in /dev/shm, readable and writable by this user only (worker side)."""
        _check_size(size)
        path = directory / f"tinyps-{secrets.token_hex(16)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, 2 * size)
            memory = mmap.mmap(fd, 2 * size)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(memory, path, size)

    @classmethod
    def open(cls, name: str, size: int) -> Mailbox:
        """Map the mailbox a worker created (server side), after checking that it is one."""
        if not _NAME.fullmatch(name):
            raise MailboxError(f"mailbox name {name!r} is not tinyps-<32 hex digits>")
        _check_size(size)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise MailboxMissing(f"no mailbox {name} in {SHM_DIR}: is the worker on another "
                                 "host?") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise MailboxError(f"mailbox {name} is not a regular file of this user")
            if info.st_size != 2 * size:
                raise MailboxError(f"mailbox {name} holds {info.st_size} bytes, not 2 * {size}")
            memory = mmap.mmap(fd, 2 * size)
        finally:
            os.close(fd)
        return cls(memory, path, size)

    def unlink(self) -> None:
        """Remove the file's name; the mappings stay (worker side, once the server mapped it)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        # An array that still views the mapping keeps it until that array goes.
        with contextlib.suppress(BufferError):
            self._memory.close()

    # -- the halves -----------------------------------------------------------------------

    def gradients(self, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
        """A view of `count` values of `dtype` in the gradient half, from byte `offset`."""
        return self._view(0, offset, np.dtype(dtype), count)

    def weights(self, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
        """A view of `count` values of `dtype` in the weight half, from byte `offset`."""
        return self._view(self.size, offset, np.dtype(dtype), count)

    def _view(self, half: int, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
        nbytes = count * dtype.itemsize
        if offset < 0 or count < 0 or offset + nbytes > self.size:
            raise MailboxError(f"bytes [{offset}, {offset + nbytes}) are outside the mailbox's "
                               f"{self.size} bytes")
        return np.frombuffer(self._memory, dtype, count, half + offset)


def _check_size(size: int) -> None:
    if not 0 < size <= _MAX_SIZE:
        raise MailboxError(f"mailbox size must be in (0, {_MAX_SIZE}] bytes, got {size}")
