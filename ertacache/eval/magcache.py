"""MagCache-style baseline: a static schedule from calibrated residual magnitude ratios.

Published rule (MagCache, Ma et al. 2025), written here from its description:
the magnitude ratio gamma_i = ||r_i|| / ||r_{i-1}|| of consecutive block
residuals is stable across prompts, so it is measured once on calibration
prompts. Walking the steps after a retention window that always computes,
a reused step multiplies an accumulated ratio by gamma_i and adds
|1 - accumulated ratio| to an accumulated error; the step is reused while that
error stays below a threshold delta and at most K steps in a row are reused,
otherwise it computes and the accumulators reset. The schedule is the same for
every prompt. Here delta is solved for the full-step budget and, as for every
method in this harness, the last step computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ertacache.errors import UserError
from ertacache.eval.config import MagCacheConfig
from ertacache.profile.schedule import fill_budget, solve_lambda


@dataclass
class MagCacheSchedule:
    mask: tuple[bool, ...]
    threshold: float
    max_skip: int
    retention_steps: int

    def info(self) -> dict:
        return {"threshold": self.threshold, "max_skip": self.max_skip, "retention_steps": self.retention_steps}


def calibrated_ratios(mag_ratio: np.ndarray) -> np.ndarray:
    """(P, T) per-prompt ratios -> (T,) the mean over calibration prompts."""
    return np.asarray(mag_ratio, dtype=np.float64).mean(axis=0)


def magcache_mask(ratios: np.ndarray, threshold: float, max_skip: int, retention_steps: int,
                  final_steps: int = 1) -> tuple[tuple[bool, ...], np.ndarray]:
    """The mask for one threshold, and each step's accumulated error had it been reused.

    Returns (mask (T,), step_error (T,)); step_error ranks reused steps for
    :func:`fill_budget` (0 on steps that compute).
    """
    steps = len(ratios)
    mask, step_err = [], np.zeros(steps)
    acc_ratio, acc_err, skipped = 1.0, 0.0, 0
    for i in range(steps):
        forced = i < retention_steps or i >= steps - final_steps
        acc_ratio *= float(ratios[i])
        acc_err += abs(1.0 - acc_ratio)
        skipped += 1
        if not forced and acc_err < threshold and skipped <= max_skip:
            mask.append(False)
            step_err[i] = acc_err
        else:
            mask.append(True)
            acc_ratio, acc_err, skipped = 1.0, 0.0, 0
    return tuple(mask), step_err


def retention_steps(steps: int, budget: int, config: MagCacheConfig) -> int:
    """The retention window, shrunk to fit the budget (at least step 0 computes)."""
    return max(1, min(round(config.retention_ratio * steps), budget - config.final_steps))


def smallest_max_skip(ratios: np.ndarray, budget: int, retention: int, config: MagCacheConfig) -> int:
    """K = config.max_skip, raised until reusing wherever allowed fits the budget."""
    steps = len(ratios)
    for k in range(config.max_skip, steps + 1):
        if sum(magcache_mask(ratios, np.inf, k, retention, config.final_steps)[0]) <= budget:
            return k
    raise UserError(f"no MagCache schedule reaches {budget} full steps of {steps}; lower the speedup")


def solve_magcache(ratios: np.ndarray, budget: int, config: MagCacheConfig) -> MagCacheSchedule:
    """Threshold delta by bisection, then the budget filled exactly (largest errors compute first)."""
    steps = len(ratios)
    retention = retention_steps(steps, budget, config)
    k = smallest_max_skip(ratios, budget, retention, config)

    def probe(delta: float):
        mask, err = magcache_mask(ratios, delta, k, retention, config.final_steps)
        return sum(mask), (mask, err)

    delta, _, (mask, err) = solve_lambda(probe, budget, lam_hi=0.1, iterations=40, rel_tol=1e-6)
    mask = fill_budget(mask, err, budget)
    return MagCacheSchedule(mask=mask, threshold=float(delta), max_skip=k, retention_steps=retention)
