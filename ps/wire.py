"""The old home of the tensor codec's Slice helpers: every name here now lives in ps.codec.

Kept so that old imports go on working; new code imports ps.codec.
"""

from ps.codec import (
    MAX_MESSAGE_BYTES,
    WIRE_DTYPES,
    WireError,
    decode_slice,
    raw_slice,
    unpack,
    write_slice,
)

__all__ = ["MAX_MESSAGE_BYTES", "WIRE_DTYPES", "WireError", "decode_slice", "raw_slice",
           "unpack", "write_slice"]
