"""Tensors on the wire: NumPy arrays to and from `Slice` messages, as raw little-endian bytes.

Decoding checks dtype, shape and byte length against each other. float32 values are never
copied: the array is a read-only view of the message's bytes, and the store copies what it
keeps; 16-bit values are decoded into a new array, or (raw_slice) left as their codes.
"""

from __future__ import annotations

import math

import numpy as np

from kernels import bf16_decode, fp16_decode
from ps import ps_pb2

__all__ = ["MAX_MESSAGE_BYTES", "WIRE_DTYPES", "WireError", "decode_slice", "raw_slice",
           "unpack", "write_slice"]

# Clients cut tensors into chunks of a few MiB; this limit only has to exceed one chunk and its
# framing with room to spare, so that a chunk-size setting never meets it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Wire dtype -> the array type of its bytes: 16-bit formats travel as bit patterns (uint16)
# that the kernels decode to float32.
WIRE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<u2"),
               "bfloat16": np.dtype("<u2")}
_UNPACK = {"float32": lambda a: a, "float16": fp16_decode, "bfloat16": bf16_decode}


def unpack(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values from the array of format `dtype` they travelled as (float32: itself)."""
    return _UNPACK[dtype](raw)


class WireError(ValueError):
    """A message whose bytes, dtype and shape do not agree."""


def write_slice(
    msg: ps_pb2.Slice, name: str, start: int, values: np.ndarray, version: int = 0
) -> ps_pb2.Slice:
    """Fill `msg` with a flat float32 array: tensor `name` from flat element `start` on.

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


def decode_slice(msg: ps_pb2.Slice) -> np.ndarray:
    """The values of a Slice as a float32 array of its shape (float32: a read-only view of
    the message's bytes; 16-bit formats: decoded into a new array)."""
    return unpack(raw_slice(msg), msg.dtype)


def raw_slice(msg: ps_pb2.Slice) -> np.ndarray:
    """The values of a Slice as they travelled, in an array of its shape: a read-only view of
    the message's bytes, float32 or (16-bit formats) uint16 codes. For a reader that can use
    the codes without decoding them first (a server's fused fp16 update)."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{msg.name!r}: dtype {msg.dtype!r} is not one of "
                        f"{', '.join(WIRE_DTYPES)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{msg.name!r}: negative dimension in shape {list(shape)}")
    data = msg.data  # each read of a bytes field makes a new copy: read it once
    want = math.prod(shape) * dtype.itemsize
    if len(data) != want:
        raise WireError(f"{msg.name!r}: shape {list(shape)} of {msg.dtype} needs {want} "
                        f"bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)
