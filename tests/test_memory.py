"""ps.memory: bytes written in place are ordinary bytes, and a failed fill leaks nothing."""

import numpy as np
import pytest

from ps.memory import filled_bytes


def test_filled_bytes_are_ordinary_bytes():
    want = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)

    def fill(view: np.ndarray) -> None:
        assert view.dtype == np.uint8 and view.size == want.size and view.flags.writeable
        view[:] = want

    got = filled_bytes(want.size, fill)
    assert type(got) is bytes and got == want.tobytes()
    assert hash(got) == hash(want.tobytes())  # hashed as its contents, like any bytes
    assert {got: 1}[want.tobytes()] == 1


def test_empty_and_refused_sizes():
    assert filled_bytes(0, lambda view: None) == b""
    with pytest.raises(ValueError, match="filled_bytes: size must be >= 0, got -1"):
        filled_bytes(-1, lambda view: None)


def test_a_failing_fill_raises_and_returns_nothing():
    def fill(view: np.ndarray) -> None:
        view[:2] = 7
        raise RuntimeError("the encoder refused its input")

    with pytest.raises(RuntimeError, match="the encoder refused its input"):
        filled_bytes(16, fill)
