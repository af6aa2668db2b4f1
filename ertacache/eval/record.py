"""One uncached pass over the calibration set, measuring what every method calibrates on.

ERTACache's open loop needs the residual error matrix; the TeaCache-style
baseline needs, per prompt and step, the relative L1 change of the
timestep-modulated input and of the model output (to fit its rescaling
polynomial); the magnitude ratio of consecutive residuals (MagCache's
signal) is reported with the results. All three come from the same uncached
trajectories, so they are gathered in one pass through :func:`error_matrix`'s
observer hook.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ertacache.profile.calibrate import CalibrationSet, error_matrix, rel_l1_per_sample
from ertacache.profile.config import CalibrationConfig


def magnitude_ratio_per_sample(new: torch.Tensor, old: torch.Tensor, n_branches: int) -> torch.Tensor:
    """(nb*b, N, D) residuals -> (b,) mean over tokens and branches of ||r_new||_2 / ||r_old||_2 per token."""
    ratio = new.float().norm(dim=-1) / old.float().norm(dim=-1).clamp_min(1e-12)  # (nb*b, N)
    return ratio.unflatten(0, (n_branches, -1)).mean(dim=(0, 2))  # (nb, b, N) -> (b,)


def calibrated_ratios(mag_ratio: np.ndarray) -> np.ndarray:
    """(P, T) per-prompt magnitude ratios -> (T,) their mean over calibration prompts (for the plots/JSON)."""
    return np.asarray(mag_ratio, dtype=np.float64).mean(axis=0)


@dataclass
class CalibrationRecord:
    """Per-step statistics of the uncached calibration trajectories (P prompts, T steps).

    errors: (T, T) open-loop errors[j, i] = mean_p ||r_j - r_i||_1 / ||r_i||_1.
    mod_change: (P, T) relative L1 change of the first block's modulated input
        from step i-1 to i (NaN at step 0).
    out_change: (P, T) the same for the branch velocities (model output).
    mag_ratio: (P, T) mean per-token residual norm ratio r_i / r_{i-1} (1 at step 0).
    """

    errors: np.ndarray
    mod_change: np.ndarray
    out_change: np.ndarray
    mag_ratio: np.ndarray
    wall_s: float

    @property
    def steps(self) -> int:
        return self.errors.shape[0]

    def residual_change(self) -> np.ndarray:
        """(T,) open-loop error of reusing the previous step's residual (0 at step 0)."""
        out = np.zeros(self.steps)
        out[1:] = np.diagonal(self.errors, offset=1)
        return out


class _Observer:
    """Collects the baselines' signals; keeps each micro-batch's previous step."""

    def __init__(self, cal: CalibrationSet):
        shape = (cal.prompts, cal.steps)
        self.cal = cal
        self.mod_change = np.full(shape, np.nan)
        self.out_change = np.full(shape, np.nan)
        self.mag_ratio = np.ones(shape)
        self.prev: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, i, sl, x_in, timestep, text, v, r) -> None:
        adapter, nb = self.cal.adapter, self.cal.n_branches
        mod = adapter.modulated_input(adapter.pre(x_in, timestep, text))  # (nb*b, N, D)
        if i > 0:
            prev_mod, prev_v, prev_r = self.prev[sl.start]
            self.mod_change[sl, i] = rel_l1_per_sample(mod, prev_mod, nb).cpu().numpy()
            self.out_change[sl, i] = rel_l1_per_sample(v, prev_v, nb).cpu().numpy()
            self.mag_ratio[sl, i] = magnitude_ratio_per_sample(r, prev_r, nb).cpu().numpy()
        self.prev[sl.start] = (mod, v, r)


def record_calibration(cal: CalibrationSet, batch_size: int = 16, progress: bool = True) -> CalibrationRecord:
    """Run the calibration prompts uncached once and keep every statistic a method fits on."""
    observer = _Observer(cal)
    start = time.perf_counter()
    with torch.no_grad():
        errors = error_matrix(cal, CalibrationConfig(lam=0.0, loop="open", batch_size=batch_size), progress,
                              observe=observer)
    return CalibrationRecord(errors=errors, mod_change=observer.mod_change, out_change=observer.out_change,
                             mag_ratio=observer.mag_ratio, wall_s=time.perf_counter() - start)
