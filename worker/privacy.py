"""DP-SGD on a worker: Poisson-sampled batches, per-example clipping, Gaussian noise.

As in Abadi et al. 2016 and Opacus: each example's gradient is clipped to L2 norm C, the
clipped gradients are summed, Gaussian noise of standard deviation sigma*C is added to the
sum (here on the worker, or once on the servers: see DPConfig.noise_at), and the sum is
divided by the expected batch size. The accountant (worker/accountant.py) turns sigma, the
sampling rate and the number of steps into epsilon.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ps.settings import setting

__all__ = ["NOISE_AT", "DPConfig", "PrivacyConfig", "add_noise", "poisson_batches"]

NOISE_AT = ("worker", "server")


@dataclass(frozen=True)
class DPConfig:
    noise: float  # sigma: the noise's standard deviation in units of the clip norm
    clip: float  # C: each example's gradient is clipped to this L2 norm
    delta: float = 1e-5  # the delta of the (epsilon, delta) guarantee
    # "worker": each worker noises its own sum before the push (no trust in the servers);
    # "server": sync servers add the noise once to the step's aggregate (a trusted aggregator).
    noise_at: str = "worker"
    seed: int | None = None  # None: noise from the OS's entropy (secret, as privacy needs)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"dp noise (sigma) must be >= 0, got {self.noise}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp clip (C) must be > 0, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta}")
        if self.noise_at not in NOISE_AT:
            raise ValueError(f"dp noise_at must be one of {', '.join(NOISE_AT)}, "
                             f"got {self.noise_at!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    """A run's DP-SGD settings: on when dp_noise or dp_target_epsilon is given."""

    dp_noise: float | None = setting(
        None, "DP-SGD: Gaussian noise of std SIGMA*C on each clipped sum", metavar="SIGMA")
    dp_clip: float = setting(1.0, "DP-SGD: clip each example's gradient to this L2 norm",
                             metavar="C")
    dp_delta: float = setting(1e-5, "DP-SGD: the delta of (epsilon, delta)")
    dp_noise_at: str = setting(
        "worker", "worker: each worker noises its push; server: sync servers noise the "
                  "aggregate once (a trusted aggregator)", choices=NOISE_AT)
    dp_target_epsilon: float | None = setting(
        None, "DP-SGD: choose sigma so that the planned steps spend epsilon E", metavar="E",
        aliases=("--target-epsilon",))
    dp_seed: int | None = setting(
        None, "seed the DP noise (repeatable runs; default: secret OS entropy)")

    def __post_init__(self) -> None:
        if not self.on:
            if self.dp_seed is not None or self.dp_noise_at != "worker":
                raise ValueError("dp settings need --dp-noise or --dp-target-epsilon")
            return
        if self.dp_target_epsilon is not None and not self.dp_target_epsilon > 0:
            raise ValueError(f"dp_target_epsilon must be > 0, got {self.dp_target_epsilon}")
        self.dp()  # the noise, clip, delta and noise_at checks live in DPConfig

    @property
    def on(self) -> bool:
        """Whether the run trains with DP-SGD."""
        return self.dp_noise is not None or self.dp_target_epsilon is not None

    def dp(self) -> DPConfig | None:
        """The workers' DP settings (sigma as settled; see tinyps.privacy.plan)."""
        if not self.on:
            return None
        return DPConfig(noise=self.dp_noise or 0.0, clip=self.dp_clip, delta=self.dp_delta,
                        noise_at=self.dp_noise_at, seed=self.dp_seed)


def poisson_batches(n: int, rate: float, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of range(n), each example in each batch with probability `rate`
    independently: the sampling the accountant's subsampled Gaussian mechanism assumes (so
    batch sizes vary, around rate * n)."""
    if n < 1:
        raise ValueError("cannot draw batches from an empty shard")
    if not 0 < rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {rate}")
    while True:
        yield np.flatnonzero(rng.random(n) < rate)


def add_noise(grads: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> None:
    """Add independent N(0, std^2) to every element of every gradient, in place."""
    for g in grads.values():
        g += rng.normal(0.0, std, g.shape).astype(np.float32)
