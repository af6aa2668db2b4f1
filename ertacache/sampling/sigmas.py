"""Sigma tables for flow-matching Euler sampling with Wan's shift.

Wan samples with ``FlowMatchEulerDiscreteScheduler(shift=S)``. diffusers applies
the shift twice on that path (once when the scheduler is built, to find
``sigma_min``, and again in ``set_timesteps``); :func:`nominal_sigmas` reproduces
that exactly so our tables equal the scheduler's, as a test checks.
"""

from __future__ import annotations

import numpy as np

from ertacache.errors import UserError


def _shift(sigma: np.ndarray | float, shift: float) -> np.ndarray | float:
    """Wan's time shift: pushes sigmas toward 1 (more steps at high noise) for shift > 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def nominal_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """The scheduler's sigma table: ``steps + 1`` values from ~1 down to exactly 0 (float64)."""
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise UserError(f"shift must be > 0, got {shift}")
    # The scheduler builds sigma_min from its float32 training table, then shifts it.
    train_sigma_min = np.float32(1.0 / num_train_timesteps)
    sigma_min = float(np.float32(_shift(train_sigma_min, np.float32(shift))))
    sigma_max = 1.0  # shift(1) == 1 for any shift
    ramp = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = _shift(ramp / num_train_timesteps, shift)
    return np.append(sigmas, 0.0)


def validate_sigma_table(sigmas: np.ndarray | list[float], steps: int, what: str = "sigma table") -> None:
    """A usable table has ``steps + 1`` finite entries, strictly decreasing, ending exactly at 0."""
    arr = np.asarray(sigmas, dtype=np.float64)
    if arr.shape != (steps + 1,):
        raise UserError(f"{what} must have steps + 1 = {steps + 1} entries, got {arr.shape[0] if arr.ndim else 0}")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{what} contains NaN or Inf")
    if arr[-1] != 0.0:
        raise UserError(f"{what} must end exactly at 0, ends at {arr[-1]!r}")
    if not np.all(np.diff(arr) < 0):
        raise UserError(f"{what} must be strictly decreasing")
