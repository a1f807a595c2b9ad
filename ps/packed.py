"""Packed: values in a 16-bit format as they travel (float16 or bfloat16 codes).

The servicer wraps 16-bit wire gradients in it; the store checks the codes as they are and
decodes them to float32 only where the update cannot read the codes itself. The other way, a
pull's destination may be Packed codes: `write_values` encodes the weights into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import (
    bf16_all_finite,
    bf16_decode,
    bf16_encode,
    fp16_all_finite,
    fp16_decode,
    fp16_encode,
)

__all__ = ["Packed", "write_values"]

# The 16-bit formats: their decoders to float32, and their finiteness checks on the codes.
_DECODE = {"float16": fp16_decode, "bfloat16": bf16_decode}
_FINITE = {"float16": fp16_all_finite, "bfloat16": bf16_all_finite}
_ENCODE = {"float16": fp16_encode, "bfloat16": bf16_encode}


@dataclass(frozen=True)
class Packed:
    """The uint16 codes of float16 or bfloat16 values. Plain SGD in async and ssp mode updates
    straight from the codes (Optimizer.step_codes), which saves writing and reading a float32
    copy."""

    codes: np.ndarray  # uint16
    fmt: str  # "float16" | "bfloat16"

    def __post_init__(self) -> None:
        if self.fmt not in _DECODE:
            raise ValueError(f"Packed: fmt must be one of {', '.join(_DECODE)}, got {self.fmt!r}")
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype != np.uint16:
            raise ValueError(f"Packed: codes must be a uint16 array, got "
                             f"{getattr(self.codes, 'dtype', type(self.codes).__name__)}")

    def decode(self) -> np.ndarray:
        """The float32 values (a new array)."""
        return _DECODE[self.fmt](self.codes)

    def all_finite(self) -> bool:
        """No inf or NaN among the values, read from the codes (half the bytes of float32)."""
        return bool(_FINITE[self.fmt](self.codes))


def write_values(values: np.ndarray, dest: np.ndarray | Packed) -> None:
    """Write float32 `values` into `dest` as it holds them: a float32 array takes a copy,
    Packed codes their 16-bit encoding (in one pass, with no temporary array)."""
    if isinstance(dest, Packed):
        _ENCODE[dest.fmt](values, dest.codes)
    else:
        np.copyto(dest, values.reshape(dest.shape))
