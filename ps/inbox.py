"""Tensor requests as the servicer's handlers take them: one shape, whichever way they came.

A Pull, Push or PushPull comes over gRPC or the local socket (ps/local.py), its tensors in the
message or in the worker's shared-memory mailbox (ps/mailbox.py). The inbox decodes each into a
TensorRequest: gradients as arrays, and where the weights go back. It holds the mailboxes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ps import ps_pb2
from ps.codec import WIRE_DTYPES, CodecError, WireSlice, decode_push_request, raw_slice
from ps.keys import Key, KeyId
from ps.mailbox import Mailbox, MailboxError, MailboxLost

__all__ = ["Inbox", "TensorRequest"]

# key -> (byte offset in the mailbox's weight half, a view there of the reply's wire format)
Destinations = dict[KeyId, tuple[int, np.ndarray]]


@dataclass(frozen=True)
class TensorRequest:
    """A Pull, Push or PushPull, decoded. The push half is empty for a Pull."""

    worker: int
    step: int | None  # push: the step pushed; pull: the step to wait for (None: at once)
    keys: list[KeyId] | None  # the keys asked for or pushed, in order; None: every key
    dtype: str  # the wire format of the weights sent back (a push's: its gradients')
    # key -> (values as they travelled: float32, or uint16 codes of `format`; format; the
    # version they were computed from)
    grads: dict[KeyId, tuple[np.ndarray, str, int]] = field(default_factory=dict)
    scale: float = 1.0  # the loss scale the gradients carry
    skip: bool = False  # the worker found inf or NaN: nothing to apply
    owned: bool = False  # the gradients are private copies (from a mailbox): keep them as they are
    received: int = 0  # tensor bytes that came with it: the message's, or the mailbox's
    into: Destinations | None = None  # the weights go to the worker's mailbox; None: the reply

    @property
    def shared_bytes(self) -> int:
        """Bytes of weights that a reply writes to the worker's mailbox."""
        return 0 if self.into is None else sum(view.nbytes for _, view in self.into.values())


def wire_dtype(name: str) -> str:
    """`name` if it is a wire format, else CodecError."""
    if name not in WIRE_DTYPES:
        raise CodecError(f"dtype {name!r} is not one of {', '.join(WIRE_DTYPES)}")
    return name


class Inbox:
    """Decodes tensor requests against this server's layout (`layout()`, a store's) and the
    mailboxes its workers attached."""

    def __init__(self, layout: Callable[[], tuple[Key, ...]]) -> None:
        self._layout = layout
        self._lock = threading.Lock()
        self._mailboxes: dict[int, Mailbox] = {}  # worker -> its shared-memory mailbox
        self._sizes: tuple[tuple[Key, ...] | None, dict[KeyId, int]] = (None, {})

    def attach(self, worker: int, name: str, size: int) -> None:
        """Map a worker's mailbox; a newer one replaces the old, which is unmapped once no
        request still uses it."""
        mailbox = Mailbox.open(name, size)
        with self._lock:
            self._mailboxes[worker] = mailbox

    def pull(self, msg: ps_pb2.PullRequest) -> TensorRequest:
        keys = [(k.name, k.start) for k in msg.keys] or None
        dtype = wire_dtype(msg.dtype or "float32")
        into = None
        if msg.mailbox:
            mailbox = self._mailbox(msg.worker, msg.mailbox)
            if not msg.keys:
                raise MailboxError("a shared pull must name its keys and their mailbox offsets")
            room = self._room(mailbox, {(ref.name, ref.start): ref.offset for ref in msg.keys})
            into = _views(mailbox, room, dtype)
        return TensorRequest(msg.worker, msg.step if msg.step >= 0 else None, keys, dtype,
                             into=into)

    def push(self, payload: bytes) -> TensorRequest:
        """A Push or PushPull from its bytes, read in place (a mailbox's gradients: copied)."""
        push = decode_push_request(payload)
        received, mailbox, room = len(payload), None, None
        if push.mailbox:
            mailbox = self._mailbox(push.worker, push.mailbox)
            room = self._room(mailbox, {(s.name, s.start): s.offset for s in push.slices})
        grads = {}
        for s in push.slices:
            if (s.name, s.start) in grads:
                raise CodecError(f"push: {s.name!r} at {s.start} appears twice")
            if mailbox is not None:
                s = _from_mailbox(mailbox, s)
                received += len(s.data)
            grads[(s.name, s.start)] = (raw_slice(s), s.dtype, s.version)
        # The weights go back in the format the gradients came in, where the gradients were.
        dtype = push.slices[0].dtype if push.slices else "float32"
        return TensorRequest(
            push.worker, push.step, list(grads), dtype, grads, push.grad_scale, push.skip,
            owned=mailbox is not None, received=received,
            into=None if mailbox is None else _views(mailbox, room, dtype))

    def _mailbox(self, worker: int, name: str) -> Mailbox:
        with self._lock:
            mailbox = self._mailboxes.get(worker)
        if mailbox is None or mailbox.name != name:
            raise MailboxLost(f"worker {worker} has no mailbox {name} on this server: "
                              "attach first")
        return mailbox

    def _room(self, mailbox: Mailbox, offsets: dict[KeyId, int]) -> dict[KeyId, tuple[int, int]]:
        """key -> (offset, size) of the known keys, once each key's float32 values are known to
        fit at its offset: checked before anything is taken or written, so that a refused
        request changes nothing. (An unknown key: the store says so.)"""
        layout = self._layout()
        if self._sizes[0] is not layout:  # the layout changes only at init or restore
            self._sizes = (layout, {k.id: k.size for k in layout})
        sizes = self._sizes[1]
        room = {}
        for key_id, offset in offsets.items():
            if key_id in sizes:
                mailbox.weights(offset, np.float32, sizes[key_id])  # raises if outside
                room[key_id] = (offset, sizes[key_id])
        return room


def _views(mailbox: Mailbox, room: dict[KeyId, tuple[int, int]], dtype: str) -> Destinations:
    """Where each key's weights go in the mailbox, as arrays of the wire format `dtype`."""
    wire = WIRE_DTYPES[dtype]
    return {key_id: (offset, mailbox.weights(offset, wire, size))
            for key_id, (offset, size) in room.items()}


def _from_mailbox(mailbox: Mailbox, piece: WireSlice) -> WireSlice:
    """The slice with its data copied out of the worker's mailbox: the worker may write there
    at any time, so the store must check and keep a private copy."""
    dtype = WIRE_DTYPES.get(piece.dtype)
    if dtype is None or any(d < 0 for d in piece.shape):
        return piece  # raw_slice says what is wrong with it
    raw = mailbox.gradients(piece.offset, dtype, math.prod(piece.shape)).copy()
    return replace(piece, data=memoryview(raw).cast("B"))
