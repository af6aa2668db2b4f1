"""Sigma tables for flow-matching Euler sampling with a static shift (Wan's).

Wan samples with ``FlowMatchEulerDiscreteScheduler(shift=S)``. diffusers applies
the shift twice on that path (once when the scheduler is built, to find
``sigma_min``, and again in ``set_timesteps``); :func:`nominal_sigmas` reproduces
that exactly so our tables equal the scheduler's, as a test checks. The formulas live in
:class:`ertacache.models.family.SigmaSchedule` with the resolution-dependent (FLUX) variant.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ertacache.errors import UserError
from ertacache.models.family import STATIC, VP, SigmaSchedule


def nominal_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """The static-shift scheduler's sigma table: ``steps + 1`` values from ~1 down to exactly 0 (float64).

    Wan's schedule; a stage that holds a model asks its family instead
    (:meth:`ertacache.models.family.ModelFamily.sigmas`), which may shift by resolution (FLUX).
    """
    return SigmaSchedule(STATIC, num_train_timesteps=num_train_timesteps).table(steps, shift)


def request_sigmas(bundle, settings, steps: int | None = None) -> np.ndarray:
    """The nominal sigma table of one request: its model family's schedule at the request's size.

    ``bundle``: a loaded model (:class:`~ertacache.models.loading.ModelBundle`: its ``adapter``, and its
    ``layout`` when the family's shift depends on the token count); ``settings``: a
    :class:`~ertacache.sampling.settings.SampleSettings`. Wan's static shift gives
    ``nominal_sigmas(settings.steps, settings.shift)`` exactly; a recipe's ``sigma_schedule`` overrides the
    family's kind (FLUX.1-schnell: ``"ramp"``). A ``"vp"`` family's table (CogVideoX) is its checkpoint
    scheduler's, held by the adapter. ``steps`` overrides ``settings.steps``.
    """
    schedule = bundle.adapter.family.sigma_schedule
    override = getattr(getattr(bundle, "recipe", None), "sigma_schedule", None)  # e.g. FLUX.1-schnell's "ramp"
    if override is not None and override != schedule.kind:
        schedule = replace(schedule, kind=override)
    steps = settings.steps if steps is None else steps
    if schedule.kind == VP:  # CogVideoX: the table is the checkpoint scheduler's, which the adapter holds
        adapter = bundle.adapter
        adapter.noise_schedule.check_shift(settings.shift)
        return adapter.own_sigmas(steps)
    seq_len = None if schedule.uses_shift else bundle.layout.tokens(settings.height, settings.width, settings.frames)
    return schedule.table(steps, settings.shift, seq_len)


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
