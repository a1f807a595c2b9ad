"""The wire format of tensors: raw little-endian bytes with a dtype and a shape, and the two
messages that carry them (PullReply, PushRequest), written and read without protobuf's copies.

The protobuf runtime copies a bytes field each time it is set, read, serialised or parsed; for
MiB-sized tensors those copies cost more than the network. This module writes and reads exactly
the same wire format by hand (any protobuf library parses what it writes: a test checks both
ways): values are written once, straight into the message or a worker's mailbox, and read in
place. Decoding checks dtype, shape and byte length against each other; one error type says
what is wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kernels import bf16_decode, bf16_encode, fp16_decode, fp16_encode
from ps.keys import Key, KeyId
from ps.packed import Packed
from ps.protowire import (
    I64,
    LEN,
    VARINT,
    CodecError,
    fields,
    join,
    message,
    read_varint,
    signed,
    tag,
    text,
    varint,
)

if TYPE_CHECKING:
    from ps import ps_pb2

__all__ = [
    "MAX_MESSAGE_BYTES", "WIRE_DTYPES", "CodecError", "PullReplyView", "PushRequestView",
    "WireSlice", "decode_pull_reply", "decode_push_request", "decode_slice",
    "encode_pull_reply", "encode_push_request", "pack", "raw_slice", "unpack",
    "write_pull_reply", "write_slice", "ReplyPlan",
]

# Clients cut tensors into chunks of a few MiB; this limit only has to exceed one chunk and its
# framing with room to spare, so that a chunk-size setting never meets it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Wire dtype -> the array type of its bytes: 16-bit formats travel as bit patterns (uint16)
# that the kernels make from float32 (rounding) and decode back.
WIRE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<u2"),
               "bfloat16": np.dtype("<u2")}
_ENCODERS = {"float16": fp16_encode, "bfloat16": bf16_encode}
_UNPACK = {"float32": lambda a: a, "float16": fp16_decode, "bfloat16": bf16_decode}

# -- values -------------------------------------------------------------------------------


def pack(values: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values as the array that travels in format `dtype` (its bytes are the data);
    written into `out` (of the wire's element type and the values' size) if given."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype in _ENCODERS:
        return _ENCODERS[dtype](values, out)
    if out is None:
        return values
    out[...] = values.reshape(out.shape)
    return out


def unpack(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values from the array of format `dtype` they travelled as (float32: itself)."""
    return _UNPACK[dtype](raw)


@dataclass(frozen=True)
class WireSlice:
    """A decoded Slice; `data` is a view of the received message, not a copy."""

    name: str
    start: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    version: int
    offset: int = 0  # in a shared message: where the data is in the worker's mailbox


@dataclass(frozen=True)
class PullReplyView:
    slices: list[WireSlice]
    staleness_max: int
    step_skipped: bool
    shared: bool = False  # the values are in the worker's mailbox, not in the slices
    blocked_s: float = 0.0  # seconds the server held the pull at a barrier or bound


@dataclass(frozen=True)
class PushRequestView:
    worker: int
    step: int
    slices: list[WireSlice]
    grad_scale: float  # 1.0 when the message left it unset
    skip: bool
    mailbox: str = ""  # the gradients are in this mailbox of the worker's, not in the slices


def write_slice(
    msg: ps_pb2.Slice, name: str, start: int, values: np.ndarray, version: int = 0
) -> ps_pb2.Slice:
    """Fill a protobuf Slice with a flat float32 array: tensor `name` from flat element `start`.

    Fill the message where it lives (`reply.values.add()`): building a Slice and then putting
    it into a repeated field copies every byte again, which costs 10x more for MiB payloads.
    """
    data = np.ascontiguousarray(values, dtype=WIRE_DTYPES["float32"])
    msg.name = name
    msg.start = start
    msg.dtype = "float32"
    msg.shape.append(data.size)
    msg.data = data.tobytes()
    msg.version = version
    return msg


def decode_slice(msg: ps_pb2.Slice | WireSlice) -> np.ndarray:
    """The values of a Slice as a float32 array of its shape (float32: a read-only view of
    the message's bytes; 16-bit formats: decoded into a new array)."""
    return unpack(raw_slice(msg), msg.dtype)


def raw_slice(msg: ps_pb2.Slice | WireSlice) -> np.ndarray:
    """The values of a Slice as they travelled, in an array of its shape: a read-only view of
    the message's bytes, float32 or (16-bit formats) uint16 codes. For a reader that can use
    the codes without decoding them first (a server's fused fp16 update)."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise CodecError(f"{msg.name!r}: dtype {msg.dtype!r} is not one of "
                         f"{', '.join(WIRE_DTYPES)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"{msg.name!r}: negative dimension in shape {list(shape)}")
    data = msg.data  # each read of a protobuf bytes field makes a new copy: read it once
    want = math.prod(shape) * dtype.itemsize
    if len(data) != want:
        raise CodecError(f"{msg.name!r}: shape {list(shape)} of {msg.dtype} needs {want} "
                         f"bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# -- writing ------------------------------------------------------------------------------


# From this many values up, 16-bit codes are written straight into the message rather than
# into an array that is then copied in: that saves a pass over them, about 40% of the time to
# encode a MiB-sized chunk, while below it the extra NumPy calls cost more than the pass
# saves. (Side by side, it took bench_precision's 16 MiB fp16 push from 1.42-1.49x faster
# than fp32 to 1.51-1.59x.)
_IN_PLACE_MIN = 1 << 16


class _Codes:
    """A message part of 16-bit codes still to be made: `len` is their size on the wire, and
    protowire.join has the kernel write them straight into the message."""

    def __init__(self, values: np.ndarray, dtype: str) -> None:
        self.values, self.dtype = values, dtype

    def __len__(self) -> int:
        return 2 * self.values.size

    def write(self, dest: np.ndarray) -> None:
        pack(self.values, self.dtype, dest.view(np.uint16))


class _Hole:
    """A message part left empty: the `size` values of a key, `nbytes` on the wire, which the
    store writes straight into the message (see ReplyPlan)."""

    def __init__(self, size: int, nbytes: int) -> None:
        self.size, self.nbytes = size, nbytes

    def __len__(self) -> int:
        return self.nbytes


def _slice_parts(name: str, start: int, values: np.ndarray, version: int,
                 dtype: str = "float32", offset: int | None = None,
                 encoded: bool = False) -> list:
    """A Slice's fields in field order; default values left out, as protobuf does.
    With an offset, the data stays out (it is in a mailbox): values only give the shape.
    encoded: the values are already the array of format `dtype` that travels."""
    if offset is not None:
        data = b""
    elif isinstance(values, _Hole):
        data = values
    elif encoded:
        data = memoryview(np.ascontiguousarray(values)).cast("B")
    elif dtype in _ENCODERS and values.size >= _IN_PLACE_MIN:
        data = _Codes(values, dtype)
    else:
        data = memoryview(pack(values, dtype)).cast("B")
    encoded_name = name.encode()
    encoded_dtype = dtype.encode()
    packed_shape = varint(values.size)
    head = [tag(1, LEN), varint(len(encoded_name)), encoded_name]
    if start:
        head += [tag(2, VARINT), varint(start)]
    head += [tag(3, LEN), varint(len(encoded_dtype)), encoded_dtype,
             tag(4, LEN), varint(len(packed_shape)), packed_shape]
    if len(data):
        head += [tag(5, LEN), varint(len(data))]
    tail = [tag(6, VARINT), varint(version)] if version else []
    if offset:
        tail += [tag(7, VARINT), varint(offset)]
    header = b"".join(head)
    body = [header, data] if len(data) else [header]
    return body + tail


def _blocked_field(blocked_s: float) -> list[bytes]:
    """PullReply.blocked_s (a double: fixed size, so that a planned reply has room for it)."""
    return [tag(5, I64), struct.pack("<d", blocked_s)]


def encode_pull_reply(
    items: list[tuple[str, int, np.ndarray, int]], staleness_max: int = 0,
    step_skipped: bool = False, dtype: str = "float32", offsets: list[int] | None = None,
    encoded: bool = False, blocked_s: float = 0.0,
) -> bytes:
    """PullReply bytes from (name, start, float32 values, version) per key, sent as `dtype`
    (encoded: the values are already the arrays of that format).
    offsets: the values went to the worker's mailbox at these offsets; the reply says where."""
    parts = []
    for k, (name, start, values, version) in enumerate(items):
        offset = None if offsets is None else offsets[k]
        parts += message(1, _slice_parts(name, start, values, version, dtype, offset,
                                          encoded))
    if staleness_max:
        parts += [tag(2, VARINT), varint(staleness_max)]
    if step_skipped:
        parts += [tag(3, VARINT), b"\x01"]
    if offsets is not None:
        parts += [tag(4, VARINT), b"\x01"]
    if blocked_s:
        parts += _blocked_field(blocked_s)
    return join(parts)


def encode_push_request(
    worker: int, step: int, items: list[tuple[str, int, np.ndarray, int]],
    dtype: str = "float32", grad_scale: float = 0.0, skip: bool = False,
    offsets: list[int] | None = None, mailbox: str = "",
) -> bytes:
    """PushRequest bytes from a worker id, a step and (name, start, grad, version) per key.
    offsets: the gradients are in the worker's mailbox named `mailbox`, at these offsets,
    not in the message."""
    parts = []
    if worker:
        parts += [tag(1, VARINT), varint(worker)]
    if step:
        parts += [tag(2, VARINT), varint(step)]
    for k, (name, start, values, version) in enumerate(items):
        offset = None if offsets is None else offsets[k]
        parts += message(3, _slice_parts(name, start, values, version, dtype, offset))
    if grad_scale:
        parts += [tag(4, I64), struct.pack("<d", grad_scale)]
    if skip:
        parts += [tag(5, VARINT), b"\x01"]
    if mailbox:
        encoded = mailbox.encode()
        parts += [tag(6, LEN), varint(len(encoded)), encoded]
    return join(parts)


def write_pull_reply(
    got: Sequence[tuple[Key, np.ndarray | Packed, int]], dtype: str = "float32",
    staleness_max: int = 0, step_skipped: bool = False,
    offsets: Mapping[KeyId, int] | None = None, blocked_s: float = 0.0,
) -> bytes:
    """Answer a pull: PullReply bytes for (key, values, version) triples whose values are
    already in format `dtype` (a float32 array, or Packed codes: the store wrote them so).
    With `offsets` (key -> where in the worker's mailbox its values were written), the reply
    says where they are; without, they travel in it."""
    items = [(k.name, k.start, values.codes if isinstance(values, Packed) else values, version)
             for k, values, version in got]
    where = None if offsets is None else [offsets[k.id] for k, _, _ in got]
    return encode_pull_reply(items, staleness_max, step_skipped, dtype, where, encoded=True,
                             blocked_s=blocked_s)


class ReplyPlan:
    """A PullReply in the messages, laid out before its values exist, so that the store writes
    them straight into it: `Store.pull(..., out=plan.destinations(view))` makes the one pass
    over the values that a reply needs, under its lock, and nothing else runs there.

    The layout takes each key's version to be `expected`. `finish` then writes the fields
    around the values for the versions they turned out to be, and says False when a field
    needs more or fewer bytes than planned (a version that passed a power of 128, a skipped
    step): the caller then writes the reply again from the values (`write_pull_reply`).
    A pull that may wait (`may_wait`) has room for its blocked_s, written even when 0.0 (a
    parser reads an explicit default as the default), as the wait is not known beforehand.
    """

    def __init__(self, keys: Sequence[Key], dtype: str, expected: Sequence[int],
                 staleness_max: int = 0, may_wait: bool = False) -> None:
        self.keys, self.dtype, self.staleness_max = list(keys), dtype, staleness_max
        self.may_wait = may_wait
        self._wire = WIRE_DTYPES[dtype]
        self._parts = self._layout(expected, step_skipped=False)
        self.size = sum(len(p) for p in self._parts)

    def _layout(self, versions: Sequence[int], step_skipped: bool,
                blocked_s: float = 0.0) -> list:
        items = [(k.name, k.start, _Hole(k.size, k.size * self._wire.itemsize), v)
                 for k, v in zip(self.keys, versions, strict=True)]
        parts = []
        for name, start, hole, version in items:
            parts += message(1, _slice_parts(name, start, hole, version, self.dtype))
        if self.staleness_max:
            parts += [tag(2, VARINT), varint(self.staleness_max)]
        if step_skipped:
            parts += [tag(3, VARINT), b"\x01"]
        if self.may_wait or blocked_s:
            parts += _blocked_field(blocked_s)
        return parts

    def destinations(self, dest: np.ndarray) -> dict[KeyId, np.ndarray | Packed]:
        """Where each key's values go in `dest` (the new message's bytes), as the store writes
        them: float32 arrays, or Packed codes."""
        views, at = [], 0
        for part in self._parts:
            if isinstance(part, _Hole):
                views.append(dest[at:at + part.nbytes].view(self._wire))
            at += len(part)
        if self.dtype == "float32":
            return {k.id: view for k, view in zip(self.keys, views, strict=True)}
        return {k.id: Packed(view, self.dtype) for k, view in zip(self.keys, views, strict=True)}

    def finish(self, dest: np.ndarray, versions: Sequence[int], step_skipped: bool,
               blocked_s: float = 0.0) -> bool:
        """Write every field but the values into `dest`; False if the layout does not fit."""
        parts = self._layout(versions, step_skipped, blocked_s)
        if [len(p) for p in parts] != [len(p) for p in self._parts]:
            return False
        at, run_at, run = 0, 0, []  # the fields between two keys' values: one copy for them
        for part in [*parts, _Hole(0, 0)]:
            if isinstance(part, _Hole):
                if run:
                    dest[run_at:at] = np.frombuffer(b"".join(run), np.uint8)
                    run = []
                at += part.nbytes
                run_at = at
            else:
                run.append(part)
                at += len(part)
        return True


# -- reading ------------------------------------------------------------------------------


def _decode_slice(buf: memoryview) -> WireSlice:
    name, start, dtype, shape, data, version, offset = "", 0, "", [], memoryview(b""), 0, 0
    for field, wire_type, value in fields(buf):
        if field == 1 and wire_type == LEN:
            name = text(value)
        elif field == 2 and wire_type == VARINT:
            start = signed(value)
        elif field == 3 and wire_type == LEN:
            dtype = text(value)
        elif field == 4 and wire_type == LEN:  # packed
            pos = 0
            while pos < len(value):
                dim, pos = read_varint(value, pos)
                shape.append(signed(dim))
        elif field == 4 and wire_type == VARINT:  # unpacked: also legal
            shape.append(signed(value))
        elif field == 5 and wire_type == LEN:
            data = value
        elif field == 6 and wire_type == VARINT:
            version = signed(value)
        elif field == 7 and wire_type == VARINT:
            offset = signed(value)
    return WireSlice(name, start, dtype, tuple(shape), data, version, offset)


def decode_pull_reply(payload: bytes) -> PullReplyView:
    slices, staleness_max, skipped, shared, blocked = [], 0, False, False, 0.0
    for field, wire_type, value in fields(memoryview(payload)):
        if field == 1 and wire_type == LEN:
            slices.append(_decode_slice(value))
        elif field == 2 and wire_type == VARINT:
            staleness_max = signed(value)
        elif field == 3 and wire_type == VARINT:
            skipped = bool(value)
        elif field == 4 and wire_type == VARINT:
            shared = bool(value)
        elif field == 5 and wire_type == I64:
            (blocked,) = struct.unpack("<d", value)
    return PullReplyView(slices, staleness_max, skipped, shared, blocked)


def decode_push_request(payload: bytes) -> PushRequestView:
    worker, step, slices, scale, skip, mailbox = 0, 0, [], 0.0, False, ""
    for field, wire_type, value in fields(memoryview(payload)):
        if field == 1 and wire_type == VARINT:
            worker = signed(value)
            worker = (worker + (1 << 31)) % (1 << 32) - (1 << 31)  # int32
        elif field == 2 and wire_type == VARINT:
            step = signed(value)
        elif field == 3 and wire_type == LEN:
            slices.append(_decode_slice(value))
        elif field == 4 and wire_type == I64:
            (scale,) = struct.unpack("<d", value)
        elif field == 5 and wire_type == VARINT:
            skip = bool(value)
        elif field == 6 and wire_type == LEN:
            mailbox = text(value)
    return PushRequestView(worker, step, slices, scale or 1.0, skip, mailbox)
