"""Trajectory-aware timestep adjustment (ERTACache component b).

At a reused step the cached velocity is off by eps_i, so the step integrates
less far than nominal: its interval is scaled by

    phi_i = clip(1 - ||v^_i - v_i||_1 / (||v_i - v_{i-1}||_1 + eps), phi_min, 1)

and the time this leaves over is spread across the remaining steps (each later
nominal interval scaled by remaining-actual / remaining-nominal sigma), so the
trajectory still ends exactly at sigma = 0. With phi a per-step constant from
calibration, everything folds into one adjusted sigma table, and the model is
fed the adjusted sigma at every later step.
"""

from __future__ import annotations

import numpy as np


def phi_value(err: float, change: float, scale: float, phi_min: float, phi_eps: float) -> float:
    """phi for one reused step from calibration means.

    err: mean |v_used - v_true| at the step; change: mean |v_true_i - v_true_{i-1}|;
    scale: mean |v_true_i|. Where ``change`` is below ``phi_eps * scale`` the
    ratio is noise over almost nothing, so the step is left unadjusted (phi = 1)
    rather than pinned at phi_min.
    """
    guard = phi_eps * max(scale, 1e-12)
    if change <= guard:
        return 1.0
    return float(np.clip(1.0 - err / (change + guard), phi_min, 1.0))


def adjusted_sigmas(nominal: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Fold per-step phi (T,) into a sigma table (T+1,) that starts at nominal[0] and ends at 0."""
    nominal = np.asarray(nominal, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    steps = nominal.shape[0] - 1
    if phi.shape != (steps,):
        raise ValueError(f"phi must have {steps} entries, got {phi.shape}")
    out = np.empty_like(nominal)
    out[0] = nominal[0]
    for i in range(steps):
        stretch = out[i] / nominal[i]  # remaining actual / remaining nominal time
        out[i + 1] = out[i] - phi[i] * stretch * (nominal[i] - nominal[i + 1])
    out[-1] = 0.0  # the last step always computes (phi = 1): land exactly, not to rounding
    return out
