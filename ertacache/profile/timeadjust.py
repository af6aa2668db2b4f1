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

from typing import Sequence

import numpy as np

from ertacache.models.experts import segments


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


def adjusted_sigmas(nominal: np.ndarray, phi: np.ndarray, starts: Sequence[int] = (0,),
                    floors: Sequence[float] | None = None) -> np.ndarray:
    """Fold per-step phi (T,) into a sigma table (T+1,) that starts at nominal[0] and ends at 0.

    starts: the first step of each expert (two-expert models): the fold runs per segment, each
    landing exactly on the nominal sigma of the next expert's first step, which always computes,
    so the switch happens where the nominal table puts it.
    floors: per segment, the lowest sigma its steps may take (the expert boundary: a model that
    picks its expert by timestep must see each step on its own side); None: no floor.
    """
    nominal = np.asarray(nominal, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    steps = nominal.shape[0] - 1
    if phi.shape != (steps,):
        raise ValueError(f"phi must have {steps} entries, got {phi.shape}")
    floors = (0.0,) * len(starts) if floors is None else floors
    out = np.empty_like(nominal)
    for (s, e), floor in zip(segments(starts, steps), floors):
        out[s] = nominal[s]
        end = nominal[e]  # where this segment must land
        for i in range(s, e):
            stretch = (out[i] - end) / (nominal[i] - end)  # remaining actual / remaining nominal time
            out[i + 1] = out[i] - phi[i] * stretch * (nominal[i] - nominal[i + 1])
            if i + 1 < e and floor > 0.0:
                out[i + 1] = max(out[i + 1], floor)
        out[e] = end  # the next segment's first step (or the last step) computes: land exactly, not to rounding
    return out
