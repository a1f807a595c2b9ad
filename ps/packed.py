"""Packed: a gradient still in the 16-bit format it travelled in (float16 or bfloat16 codes).

The servicer wraps 16-bit wire gradients in it; the store checks the codes as they are and
decodes them to float32 only where the update cannot read the codes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import bf16_all_finite, bf16_decode, fp16_all_finite, fp16_decode

__all__ = ["Packed"]

# The 16-bit formats: their decoders to float32, and their finiteness checks on the codes.
_DECODE = {"float16": fp16_decode, "bfloat16": bf16_decode}
_FINITE = {"float16": fp16_all_finite, "bfloat16": bf16_all_finite}


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
