"""Protobuf's encoding, by hand: varints, tags and length-delimited fields, written and read.

The primitives that ps.codec writes and reads its two big messages with (the protobuf
encoding spec, https://protobuf.dev/programming-guides/encoding/), and the one error either
raises for bytes that are not a well-formed message.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ps.memory import filled_bytes

__all__ = ["I32", "I64", "LEN", "VARINT", "CodecError", "fields", "join", "message",
           "read_varint", "signed", "tag", "text", "varint"]

# Wire types (protobuf encoding spec): varint, 64-bit, length-delimited, 32-bit.
VARINT, I64, LEN, I32 = 0, 1, 2, 5


class CodecError(ValueError):
    """Bytes that are not a well-formed message, or whose dtype, shape and length disagree."""


# -- writing ------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int32/int64: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def message(field: int, parts: list) -> list:
    """An embedded message's parts, as field `field` of the one around it."""
    size = sum(len(p) for p in parts)
    return [tag(field, LEN), varint(size), *parts]


def join(parts: list) -> bytes:
    """The message: its parts copied, in order, into one bytes object. A part with a
    `write(dest)` method (16-bit codes still to be made, say) writes itself straight there."""
    runs, plain = [], []  # the bytes parts between those, joined first: fewer, larger copies
    for part in parts:
        if hasattr(part, "write"):
            runs += [b"".join(plain), part]
            plain = []
        else:
            plain.append(part)
    if not runs:
        return b"".join(plain)
    runs.append(b"".join(plain))

    def fill(dest: np.ndarray) -> None:
        at = 0
        for run in runs:
            end = at + len(run)
            if hasattr(run, "write"):
                run.write(dest[at:end])
            else:
                dest[at:end] = np.frombuffer(run, np.uint8)
            at = end

    return filled_bytes(sum(len(run) for run in runs), fill)


# -- reading ------------------------------------------------------------------------------


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise CodecError("message ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise CodecError("varint longer than ten bytes")


def signed(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of a message; LEN values are views."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise CodecError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos)
        elif wire_type == LEN:
            size, pos = read_varint(buf, pos)
            if pos + size > len(buf):
                raise CodecError(f"field {field} claims {size} bytes, {len(buf) - pos} remain")
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type in (I64, I32):
            width = 8 if wire_type == I64 else 4
            if pos + width > len(buf):
                raise CodecError(f"field {field} ends early")
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise CodecError(f"field {field} has unsupported wire type {wire_type}")
        yield field, wire_type, value


def text(view: memoryview) -> str:
    try:
        return bytes(view).decode()
    except UnicodeDecodeError:
        raise CodecError("a string field is not UTF-8") from None
