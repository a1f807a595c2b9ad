"""Injected poisoning, for teaching: workers that train on bad labels or push bad gradients.

One mechanism for every kind of misbehaving worker: `label_flip` (class c becomes C-1-c) and
`random_labels` poison the worker's data; `scaled_gradient:F` multiplies the gradient it
pushes by F (the reliability issue's Byzantine worker is scaled_gradient:-10).
"""

from __future__ import annotations

import numpy as np

from worker.shards import Shard

__all__ = ["BYZANTINE", "POISONS", "parse_poison", "poison_grads", "poison_shard"]

POISONS = ("label_flip", "random_labels", "scaled_gradient")
# --byzantine N: pointing the other way and ten times as long, it undoes the honest workers'
# steps in a mean.
BYZANTINE = "scaled_gradient:-10"


def parse_poison(text: str) -> tuple[str, float]:
    """"label_flip", "random_labels" or "scaled_gradient:F" -> (kind, F)."""
    kind, _, arg = text.partition(":")
    if kind not in POISONS:
        raise ValueError(f"poison must be one of label_flip, random_labels, "
                         f"scaled_gradient:F, got {text!r}")
    if kind != "scaled_gradient":
        if arg:
            raise ValueError(f"poison {kind} takes no argument, got {text!r}")
        return kind, 1.0
    try:
        factor = float(arg)
    except ValueError:
        raise ValueError(f"poison scaled_gradient needs a factor, as in scaled_gradient:-10; "
                         f"got {text!r}") from None
    if not np.isfinite(factor):
        raise ValueError(f"the gradient factor must be finite, got {factor}")
    return kind, factor


def poison_shard(shard: Shard, poison: str, n_classes: int, seed: int) -> Shard:
    """The shard a data-poisoning worker trains on (the same shard for gradient poisons)."""
    kind, _ = parse_poison(poison)
    if kind == "label_flip":
        return Shard(shard.X, (n_classes - 1 - shard.y).astype(shard.y.dtype), shard.indices)
    if kind == "random_labels":
        rng = np.random.default_rng((seed, 0x9015))
        labels = rng.integers(0, n_classes, len(shard.y)).astype(shard.y.dtype)
        return Shard(shard.X, labels, shard.indices)
    return shard


def poison_grads(grads: dict[str, np.ndarray], poison: str) -> dict[str, np.ndarray]:
    """The gradients a gradient-poisoning worker pushes (the same ones for data poisons)."""
    kind, factor = parse_poison(poison)
    if kind != "scaled_gradient":
        return grads
    return {name: g * np.float32(factor) for name, g in grads.items()}
