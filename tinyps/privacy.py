"""The privacy budget of a DP-SGD run: sigma chosen for a target epsilon, epsilon spent.

Each example lives in one worker's shard, so its privacy is that of the subsampled Gaussian
mechanism run by that worker alone: sampling rate q = expected batch / shard size, for that
worker's number of steps. Where the noise is added (worker or server) does not change
epsilon: either way the sum that holds the example gets noise of std sigma*C. The run's
epsilon is the largest over its workers (the smallest shard is sampled most often).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ps.settings import to_flat
from tinyps.config import LaunchConfig
from worker.accountant import RdpAccountant, dp_sgd_epsilon, sigma_for_epsilon

__all__ = ["check_resume", "plan", "spent", "steps_made"]


def _rates(config: LaunchConfig, shard_sizes: list[int]) -> list[float]:
    return [min(1.0, config.train.batch_size / n) for n in shard_sizes]


def plan(config: LaunchConfig, shard_sizes: list[int], steps: int) -> LaunchConfig:
    """The config with sigma settled: given, or chosen for dp_target_epsilon (as Opacus's
    make_private_with_epsilon). Refuses, before anything starts, a plan over its budget."""
    if not config.privacy.on:
        return config
    q = max(_rates(config, shard_sizes))
    target, sigma = config.privacy.dp_target_epsilon, config.privacy.dp_noise
    if target is not None:
        if sigma is None:
            try:
                sigma = sigma_for_epsilon(target, q, steps, config.privacy.dp_delta)
            except ValueError as err:
                raise ValueError(f"dp_target_epsilon {target}: {err}") from None
        elif (planned := dp_sgd_epsilon(q, sigma, steps, config.privacy.dp_delta)) > target:
            raise ValueError(
                f"the planned {steps} steps per worker at sigma {sigma} (sampling rate "
                f"{q:.4f}) would spend epsilon {planned:.3f}, over the budget of {target}: "
                f"train fewer steps, add noise, or leave out --dp-noise to have it chosen")
    return config.with_privacy(dataclasses.replace(config.privacy, dp_noise=sigma))


def steps_made(records: list[dict], workers: int, resumed: bool) -> list[int]:
    """The steps each worker has drawn a batch for: those it recorded in this run, and in a
    resumed run the steps before its first one here (made by the run resumed, which this
    cannot see step by step: counted as made, which can only overstate epsilon)."""
    steps: list[set[int]] = [set() for _ in range(workers)]
    for r in records:
        steps[r["worker"]].add(r["step"])
    return [len(s) + (min(s) if resumed and s else 0) for s in steps]


def check_resume(config: LaunchConfig, source: Path) -> None:
    """A resumed DP run must go on with the noise, clip and batch of the run it resumes, so
    that its epsilon is one mechanism's, counted over all the steps."""
    try:
        old = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        old = None
    keys = ("dp_noise", "dp_clip", "dp_delta", "batch_size", "partition", "seed")
    if old is None:
        if config.privacy.on:
            raise ValueError(f"resume: {source} has no readable config.json, so a DP run "
                             f"cannot know what the resumed steps spent")
        return
    if not (config.privacy.on or old.get("dp_noise") is not None):
        return
    now = to_flat(config)
    changed = {k: (old.get(k), now[k]) for k in keys if old.get(k) != now[k]}
    if changed:
        raise ValueError(f"resume: a DP run must keep the resumed run's settings so that "
                         f"epsilon adds up; changed (old, new): {changed}")


def spent(config: LaunchConfig, shard_sizes: list[int], steps_done: list[int]) -> dict:
    """summary.json's privacy figures for the steps each worker actually made."""
    if not config.privacy.on:
        return {}
    rates = _rates(config, shard_sizes)
    sigma, delta = config.privacy.dp_noise, config.privacy.dp_delta
    epsilons = [dp_sgd_epsilon(q, sigma, n, delta) for q, n in zip(rates, steps_done,
                                                                    strict=True)]
    # Epsilon after each whole epoch (1/q steps) of the worker that spends the most.
    worst = max(range(len(rates)), key=lambda w: epsilons[w])
    q, done = rates[worst], steps_done[worst]
    per_epoch, accountant, taken = [], RdpAccountant(), 0
    for epoch in range(1, math.floor(done * q + 1e-9) + 1):
        upto = min(done, round(epoch / q))
        accountant.step(q, sigma, upto - taken)
        taken = upto
        per_epoch.append(accountant.epsilon(delta))
    return {
        "dp_epsilon": max(epsilons),
        "dp_epsilon_by_epoch": per_epoch,
        "dp_epsilon_per_worker": epsilons,
        "dp_delta": delta,
        "dp_noise": sigma,
        "dp_clip": config.privacy.dp_clip,
        "dp_noise_at": config.privacy.dp_noise_at,
        "sample_rate": max(rates),
        "dp_sampling": "poisson",  # each example in each batch with probability q
    }
