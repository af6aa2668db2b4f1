"""Calibration passes: run the calibration prompts and fit mask, phi and correction.

Every calibration trajectory advances in lockstep (micro-batched through the
model), because each decision at step i (reuse or not, phi_i, a_i/b_i) is a
mean over all prompts and changes where every trajectory goes next.

Two kinds of pass:

* :func:`error_matrix` (open loop) runs plain uncached sampling and records
  errors[j, i] = mean over prompts of ||r_j - r_i||_1 / ||r_i||_1, from which
  a mask for any lambda is a cheap greedy walk.
* :func:`cached_pass` (closed loop) follows the cached sampler's own
  trajectory. At every step it computes the true velocity and residual anyway
  (calibration can afford it), and at a reused step also the cached velocity,
  which gives the error statistics where the cached sampler actually goes.
  With ``lam`` it decides the mask greedily as it goes; with ``mask`` it only
  fits phi and the correction along a given mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ertacache.errors import NumericalError
from ertacache.models.adapter import ModelAdapter
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.correction import OLSAccumulator
from ertacache.profile.schedule import fill_budget, forced_full, mask_from_error_matrix, solve_lambda
from ertacache.profile.timeadjust import adjusted_sigmas, phi_value
from ertacache.sampling.steps import (
    cached_velocity,
    combine_cfg,
    expand_branches,
    full_velocity,
    model_timestep,
    rectify,
)


@dataclass
class CalibrationSet:
    """The calibration trajectories' inputs.

    latents: (P, C, F, H, W) float32 initial noise, one row per prompt.
    text_embeds: (nb*P, L, D) cond rows, then (with CFG) uncond rows.
    """

    adapter: ModelAdapter
    latents: torch.Tensor
    text_embeds: torch.Tensor
    guidance_scale: float
    nominal_sigmas: np.ndarray
    n_branches: int = 2

    @property
    def prompts(self) -> int:
        return self.latents.shape[0]

    @property
    def steps(self) -> int:
        return len(self.nominal_sigmas) - 1

    def micro_batches(self, size: int) -> list[slice]:
        return [slice(s, min(s + size, self.prompts)) for s in range(0, self.prompts, size)]

    def text_rows(self, sl: slice) -> torch.Tensor:
        """(nb*b, L, D): the cond and uncond rows of prompts ``sl``, branch-major."""
        rows = self.text_embeds.unflatten(0, (self.n_branches, self.prompts))  # (nb, P, L, D)
        return rows[:, sl].flatten(0, 1)


@dataclass
class PassResult:
    """Everything a cached pass measured and fitted, per step (T entries each)."""

    mask: tuple[bool, ...]
    phi: np.ndarray
    sigmas: np.ndarray  # (T+1,)
    corr_a: torch.Tensor  # (T, nb, C)
    corr_b: torch.Tensor  # (T, nb, C)
    residual_error: np.ndarray  # rel. L1 of the cached residual vs the true one (0 on full steps)
    residual_change: np.ndarray  # rel. L1 of r_i vs r_{i-1}, true residuals (0 at step 0)
    velocity_error: np.ndarray  # mean |v_used - v_true| of the guided velocity
    velocity_change: np.ndarray  # mean |v_true_i - v_true_{i-1}|
    extra: dict = field(default_factory=dict)

    @property
    def full_steps(self) -> int:
        return int(sum(self.mask))


def _check_finite(v: torch.Tensor, step: int, sl: slice) -> None:
    # Calibration is allowed a host sync per step; the samplers are not.
    if not torch.isfinite(v).all():
        raise NumericalError(
            f"NaN/Inf in the model output at step {step} for calibration prompts {sl.start}..{sl.stop - 1}; "
            "check the weights and dtype (try --dtype fp32) before profiling"
        )


def rel_l1_per_sample(approx: torch.Tensor, true: torch.Tensor, n_branches: int) -> torch.Tensor:
    """(nb*b, ...) pairs -> (b,) ||approx - true||_1 / ||true||_1 over both branches of each sample.

    The calibration error of a reused residual, and (with ``true`` the previous step's value)
    the step-to-step change TeaCache- and MagCache-style rules accumulate.
    """
    diff = (approx.float() - true.float()).abs().unflatten(0, (n_branches, -1)).transpose(0, 1).flatten(1)
    ref = true.float().abs().unflatten(0, (n_branches, -1)).transpose(0, 1).flatten(1)
    # (nb*b, N, D) -> (nb, b, N, D) -> (b, nb, N, D) -> (b, nb*N*D)
    return diff.sum(1) / ref.sum(1).clamp_min(1e-12)


#: ``observe(step, prompts, x_in, timestep, text, v, residual)``: sees every model call of an uncached pass
StepObserver = Callable[[int, slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def error_matrix(
    cal: CalibrationSet, config: CalibrationConfig, progress: bool = True, observe: StepObserver | None = None
) -> np.ndarray:
    """(T, T) errors[j, i] of reusing step j's residual at step i, on uncached trajectories.

    ``observe``, if given, is called after every model call with the step, the
    prompts' slice and that call's inputs and outputs (branch rows), so other
    statistics of the same uncached pass (the evaluation baselines' signals)
    cost no second pass.
    """
    steps = cal.steps
    sig = torch.as_tensor(cal.nominal_sigmas, dtype=torch.float32, device=cal.latents.device)
    sums = np.zeros((steps, steps))
    for sl in tqdm(cal.micro_batches(config.batch_size), desc="open-loop residuals", disable=not progress):
        x = cal.latents[sl].float()
        text = cal.text_rows(sl)
        residuals = []
        with torch.no_grad():
            for i in range(steps):
                x_in = expand_branches(x, cal.n_branches).to(text.dtype)
                v, r = full_velocity(cal.adapter, x_in, model_timestep(sig[i], x_in.shape[0]), text)
                _check_finite(v, i, sl)
                if observe is not None:
                    observe(i, sl, x_in, model_timestep(sig[i], x_in.shape[0]), text, v, r)
                for j, r_j in enumerate(residuals):
                    sums[j, i] += rel_l1_per_sample(r_j, r, cal.n_branches).sum().item()
                residuals.append(r)
                x = x + (sig[i + 1] - sig[i]) * combine_cfg(v, cal.guidance_scale, cal.n_branches)
    return sums / cal.prompts


class _StepState:
    """Per micro-batch trajectory state inside a cached pass."""

    def __init__(self, x, text, sl):
        self.x, self.text, self.sl = x, text, sl
        self.residual = None  # cache from the last full step: (nb*b, N, D)
        self.v_prev = None  # last step's true guided velocity: (b, C, F, H, W)
        self.prev_r = None  # last step's true residual: (nb*b, N, D)


def cached_pass(
    cal: CalibrationSet,
    config: CalibrationConfig,
    lam: float | None = None,
    mask: Sequence[bool] | None = None,
    progress: bool = True,
    max_full: int | None = None,
) -> PassResult | None:
    """Follow the cached trajectory, deciding (``lam``) or following (``mask``) the schedule.

    With ``max_full``, the pass gives up (returns None) as soon as the mask is
    sure to exceed that many full steps: a bisection probe only needs to know
    it is over budget, and small lambdas would otherwise cost a whole pass.
    """
    if (lam is None) == (mask is None):
        raise ValueError("give exactly one of lam and mask")
    steps, nb = cal.steps, cal.n_branches
    forced = forced_full(steps, config.warmup_steps, config.final_steps)
    nominal = np.asarray(cal.nominal_sigmas, dtype=np.float64)
    device = cal.latents.device
    g = torch.tensor(float(cal.guidance_scale), device=device)
    states = [_StepState(cal.latents[sl].float(), cal.text_rows(sl), sl) for sl in cal.micro_batches(config.batch_size)]
    channels = cal.latents.shape[1]

    phi = np.ones(steps)
    sigmas = nominal.copy()
    corr_a = torch.zeros(steps, nb, channels)
    corr_b = torch.zeros(steps, nb, channels)
    out_mask: list[bool] = []
    stats = {k: np.zeros(steps) for k in ("residual_error", "residual_change", "velocity_error", "velocity_change")}

    for i in tqdm(range(steps), desc="closed-loop calibration", disable=not progress, leave=False):
        sig_i = torch.tensor(sigmas[i], dtype=torch.float32, device=device)
        t_rows = None
        per_state = []
        res_err_sum, res_change_sum = 0.0, 0.0
        with torch.no_grad():
            for st in states:
                x_in = expand_branches(st.x, nb).to(st.text.dtype)  # (nb*b, C, F, H, W)
                t_rows = model_timestep(sig_i, x_in.shape[0])
                v_true, r_true = full_velocity(cal.adapter, x_in, t_rows, st.text)
                _check_finite(v_true, i, st.sl)
                v_cached = None
                if st.residual is not None and not forced[i]:
                    v_cached = cached_velocity(cal.adapter, x_in, t_rows, st.residual)
                    res_err_sum += rel_l1_per_sample(st.residual, r_true, nb).sum().item()
                if st.prev_r is not None:
                    res_change_sum += rel_l1_per_sample(st.prev_r, r_true, nb).sum().item()
                per_state.append((x_in, v_true, r_true, v_cached))
        res_err = res_err_sum / cal.prompts
        stats["residual_change"][i] = res_change_sum / cal.prompts

        if mask is not None:
            full = bool(mask[i]) or forced[i]
        else:
            full = bool(forced[i]) or not res_err < lam
        out_mask.append(full)
        if max_full is not None and sum(out_mask) + int(forced[i + 1:].sum()) > max_full:
            return None

        if not full:
            stats["residual_error"][i] = res_err
            if config.rectify:
                acc = OLSAccumulator(nb, channels)
                for _, v_true, _, v_cached in per_state:
                    acc.update(v_cached, v_cached - v_true)
                corr_a[i], corr_b[i] = acc.solve()

        err_sum, change_sum, scale_sum, count = 0.0, 0.0, 0.0, 0
        guided = []
        for st, (_, v_true, r_true, v_cached) in zip(states, per_state):
            g_true = combine_cfg(v_true, g, nb)  # (b, C, F, H, W)
            if full:
                g_used = g_true
            else:
                g_used = combine_cfg(rectify(v_cached, corr_a[i].to(device), corr_b[i].to(device)), g, nb)
            err_sum += (g_used - g_true).abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            scale_sum += g_true.abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            if st.v_prev is not None:
                change_sum += (g_true - st.v_prev).abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            count += g_true.shape[0]
            guided.append((g_used, g_true, r_true))
        stats["velocity_error"][i] = err_sum / count
        stats["velocity_change"][i] = change_sum / count if i > 0 else 0.0

        if not full and config.time_adjust:
            phi[i] = phi_value(
                stats["velocity_error"][i], stats["velocity_change"][i], scale_sum / count,
                config.phi_min, config.phi_eps,
            )
            sigmas = adjusted_sigmas(nominal, phi)

        sig_next = torch.tensor(sigmas[i + 1], dtype=torch.float32, device=device)
        for st, (g_used, g_true, r_true) in zip(states, guided):
            st.x = st.x + (sig_next - sig_i) * g_used
            st.v_prev = g_true
            st.prev_r = r_true
            if full:
                st.residual = r_true

    return PassResult(
        mask=tuple(out_mask),
        phi=phi,
        sigmas=sigmas,
        corr_a=corr_a,
        corr_b=corr_b,
        **stats,
    )


@dataclass
class CalibrationOutcome:
    lam: float
    result: PassResult
    error_matrix: np.ndarray | None


def calibrate(
    cal: CalibrationSet,
    config: CalibrationConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    errors: np.ndarray | None = None,
    lam_hi: float = 1.0,
) -> CalibrationOutcome:
    """Fit the whole profile: mask (from lambda or a target speedup), phi, sigmas, correction.

    ``errors``: an open-loop error matrix already measured on ``cal`` (from
    :func:`error_matrix`); open-loop calibration then skips its uncached pass,
    which lets several profiles of one calibration set share it.
    ``lam_hi``: first upper end of the closed-loop lambda bisection. Every probe
    within the budget costs a whole calibration pass, so a good guess (e.g.
    twice the open-loop lambda) saves the halvings down from 1; too small a
    guess is doubled until it meets the budget, so it is always safe.
    """
    steps = cal.steps
    target = config.target_full_steps(steps) if config.speedup is not None else None

    if config.loop == "open":
        if errors is None:
            errors = error_matrix(cal, config, progress)
        elif errors.shape != (steps, steps):
            raise ValueError(f"errors must be ({steps}, {steps}) for {steps} steps, got {errors.shape}")

        def open_probe(lam):
            m = mask_from_error_matrix(errors, lam, config.warmup_steps, config.final_steps)
            return sum(m), m

        if target is None:
            lam = config.lam
            mask = open_probe(lam)[1]
        else:
            lam, _, mask = solve_lambda(open_probe, target)
            # the open-loop error of step i is its error against its last refresh
            last, step_err = 0, np.zeros(steps)
            for i, full in enumerate(mask):
                last = i if full else last
                step_err[i] = errors[last, i]
            mask = fill_budget(mask, step_err, target)
        log(f"open-loop mask: lambda={lam:.5g}, {sum(mask)}/{steps} full steps")
        result = cached_pass(cal, config, mask=mask, progress=progress)
        return CalibrationOutcome(lam=lam, result=result, error_matrix=errors)

    if target is None:
        return CalibrationOutcome(lam=config.lam, result=cached_pass(cal, config, lam=config.lam, progress=progress),
                                  error_matrix=None)

    bar = tqdm(desc=f"closed-loop bisection (target {target} full steps)", disable=not progress, unit="probe")

    def closed_probe(lam):
        res = cached_pass(cal, config, lam=lam, progress=False, max_full=target)
        bar.update()
        n = target + 1 if res is None else res.full_steps
        bar.set_postfix(lam=f"{lam:.4g}", full=n if res is not None else f">{target}")
        return n, res

    lam, n_full, result = solve_lambda(closed_probe, target, lam_hi=lam_hi)
    bar.close()
    if n_full < target:  # lambda jumped past the budget: refit along the filled mask
        mask = fill_budget(result.mask, result.residual_error, target)
        result = cached_pass(cal, config, mask=mask, progress=progress)
    log(f"closed-loop mask: lambda={lam:.5g}, {result.full_steps}/{steps} full steps")
    return CalibrationOutcome(lam=lam, result=result, error_matrix=None)
