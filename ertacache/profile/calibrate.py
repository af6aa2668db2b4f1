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

Memory: every per-prompt tensor that outlives one model call (residual
histories, cached residuals, latents, velocities) is parked in the
calibration set's :class:`~ertacache.profile.offload.HostStore` (host memory,
pinned on CUDA) and brought back one micro-batch at a time, and the fits are
running sums (:class:`~ertacache.profile.correction.OLSAccumulator`). Device
memory is therefore the model plus one micro-batch's working set, flat in the
number of prompts and steps (``docs/engines.md`` gives the formula).
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
from ertacache.profile.offload import HostStore
from ertacache.profile.schedule import (
    bisection_probes,
    fill_budget,
    forced_full,
    mask_from_error_matrix,
    solve_lambda,
)
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
    Both may live on the host: each pass moves one micro-batch at a time to the model's device.
    store: where the passes park per-prompt state between steps (see :mod:`ertacache.profile.offload`).
    """

    adapter: ModelAdapter
    latents: torch.Tensor
    text_embeds: torch.Tensor
    guidance_scale: float
    nominal_sigmas: np.ndarray
    n_branches: int = 2
    store: HostStore = field(init=False, repr=False)

    def __post_init__(self):
        self.store = HostStore(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.adapter.model.parameters()).device

    @property
    def prompts(self) -> int:
        return self.latents.shape[0]

    @property
    def steps(self) -> int:
        return len(self.nominal_sigmas) - 1

    def micro_batches(self, size: int) -> list[slice]:
        return [slice(s, min(s + size, self.prompts)) for s in range(0, self.prompts, size)]

    def latent_rows(self, sl: slice) -> torch.Tensor:
        """(b, C, F, H, W) float32 initial noise of prompts ``sl`` on the model's device."""
        return self.latents[sl].to(self.device, torch.float32)

    def text_rows(self, sl: slice) -> torch.Tensor:
        """(nb*b, L, D): the cond and uncond rows of prompts ``sl``, branch-major, on the model's device."""
        rows = self.text_embeds.unflatten(0, (self.n_branches, self.prompts))  # (nb, P, L, D)
        return rows[:, sl].flatten(0, 1).to(self.device)


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
    sig = torch.as_tensor(cal.nominal_sigmas, dtype=torch.float32, device=cal.device)
    sums = np.zeros((steps, steps))
    for sl in tqdm(cal.micro_batches(config.batch_size), desc="open-loop residuals", disable=not progress):
        _open_loop_batch(cal, sl, sig, sums, observe)
    return sums / cal.prompts


def _open_loop_batch(cal: CalibrationSet, sl: slice, sig: torch.Tensor, sums: np.ndarray,
                     observe: StepObserver | None) -> None:
    """One micro-batch's uncached trajectory, adding its pairwise residual errors into ``sums``.

    A function of its own so that every tensor of the micro-batch is freed before the next starts.
    The history of earlier residuals lives in the host store, one comes back to the device at a time.
    """
    store = cal.store
    store.clear()
    x = cal.latent_rows(sl)
    text = cal.text_rows(sl)
    with torch.no_grad():
        for i in range(cal.steps):
            x_in = expand_branches(x, cal.n_branches).to(text.dtype)
            v, r = full_velocity(cal.adapter, x_in, model_timestep(sig[i], x_in.shape[0]), text)
            _check_finite(v, i, sl)
            if observe is not None:
                observe(i, sl, x_in, model_timestep(sig[i], x_in.shape[0]), text, v, r)
            for j in range(i):
                sums[j, i] += rel_l1_per_sample(store.get(("r", j)), r, cal.n_branches).sum().item()
            store.put(("r", i), r)
            x = x + (sig[i + 1] - sig[i]) * combine_cfg(v, cal.guidance_scale, cal.n_branches)
    store.clear()


class _Trajectories:
    """Per micro-batch trajectory state of a cached pass, parked in the calibration set's store.

    Names per micro-batch k: "x" latents (b, C, F, H, W); "residual" the cache from the last full
    step (nb*b, N, D); "prev_r" last step's true residual; "v_prev" last step's true guided
    velocity (b, C, F, H, W); and within a step "r", "v_true", "v_cached", "g_used", "g_true".
    """

    def __init__(self, cal: CalibrationSet, batch_size: int):
        self.store = cal.store
        self.store.clear()
        self.slices = cal.micro_batches(batch_size)
        for k, sl in enumerate(self.slices):
            self.store.put((k, "x"), cal.latent_rows(sl))

    def __iter__(self):
        return iter(enumerate(self.slices))

    def get(self, k: int, name: str) -> torch.Tensor | None:
        return self.store.get((k, name))

    def put(self, k: int, name: str, t: torch.Tensor | None) -> None:
        self.store.put((k, name), t)


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
    device = cal.device
    g = torch.tensor(float(cal.guidance_scale), device=device)
    traj = _Trajectories(cal, config.batch_size)
    channels = cal.latents.shape[1]

    phi = np.ones(steps)
    sigmas = nominal.copy()
    corr_a = torch.zeros(steps, nb, channels)
    corr_b = torch.zeros(steps, nb, channels)
    out_mask: list[bool] = []
    stats = {k: np.zeros(steps) for k in ("residual_error", "residual_change", "velocity_error", "velocity_change")}

    for i in tqdm(range(steps), desc="closed-loop calibration", disable=not progress, leave=False):
        sig_i = torch.tensor(sigmas[i], dtype=torch.float32, device=device)
        res_err_sum, res_change_sum = 0.0, 0.0
        # the correction's sufficient statistics, gathered in case the step turns out reused
        acc = OLSAccumulator(nb, channels) if config.rectify else None
        # (1) the true step for every micro-batch, and the cached one where a cache exists
        with torch.no_grad():
            for k, sl in traj:
                text = cal.text_rows(sl)
                x_in = expand_branches(traj.get(k, "x"), nb).to(text.dtype)  # (nb*b, C, F, H, W)
                t_rows = model_timestep(sig_i, x_in.shape[0])
                v_true, r_true = full_velocity(cal.adapter, x_in, t_rows, text)
                _check_finite(v_true, i, sl)
                residual = None if forced[i] else traj.get(k, "residual")
                v_cached = None
                if residual is not None:
                    v_cached = cached_velocity(cal.adapter, x_in, t_rows, residual)
                    res_err_sum += rel_l1_per_sample(residual, r_true, nb).sum().item()
                    if acc is not None:
                        acc.update(v_cached, v_cached - v_true)
                prev_r = traj.get(k, "prev_r")
                if prev_r is not None:
                    res_change_sum += rel_l1_per_sample(prev_r, r_true, nb).sum().item()
                traj.put(k, "r", r_true)
                traj.put(k, "v_true", v_true)
                traj.put(k, "v_cached", v_cached)
                del x_in, v_true, r_true, residual, v_cached, prev_r
        res_err = res_err_sum / cal.prompts
        stats["residual_change"][i] = res_change_sum / cal.prompts

        # (2) the decision, a mean over every prompt
        if mask is not None:
            full = bool(mask[i]) or forced[i]
        else:
            full = bool(forced[i]) or not res_err < lam
        out_mask.append(full)
        if max_full is not None and sum(out_mask) + int(forced[i + 1:].sum()) > max_full:
            traj.store.clear()
            return None

        if not full:
            stats["residual_error"][i] = res_err
            if acc is not None:
                corr_a[i], corr_b[i] = acc.solve()

        # (3) the velocity each trajectory uses, and the statistics phi needs
        err_sum, change_sum, scale_sum, count = 0.0, 0.0, 0.0, 0
        for k, _ in traj:
            g_true = combine_cfg(traj.get(k, "v_true"), g, nb)  # (b, C, F, H, W)
            if full:
                g_used = g_true
            else:
                v_fixed = rectify(traj.get(k, "v_cached"), corr_a[i].to(device), corr_b[i].to(device))
                g_used = combine_cfg(v_fixed, g, nb)
            err_sum += (g_used - g_true).abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            scale_sum += g_true.abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            v_prev = traj.get(k, "v_prev")
            if v_prev is not None:
                change_sum += (g_true - v_prev).abs().mean(dim=tuple(range(1, g_true.ndim))).sum().item()
            count += g_true.shape[0]
            traj.put(k, "g_used", g_used)
            traj.put(k, "g_true", g_true)
        stats["velocity_error"][i] = err_sum / count
        stats["velocity_change"][i] = change_sum / count if i > 0 else 0.0

        if not full and config.time_adjust:
            phi[i] = phi_value(
                stats["velocity_error"][i], stats["velocity_change"][i], scale_sum / count,
                config.phi_min, config.phi_eps,
            )
            sigmas = adjusted_sigmas(nominal, phi)

        # (4) the Euler update along the (possibly adjusted) sigma table; state moves one step on
        sig_next = torch.tensor(sigmas[i + 1], dtype=torch.float32, device=device)
        for k, _ in traj:
            traj.put(k, "x", traj.get(k, "x") + (sig_next - sig_i) * traj.get(k, "g_used"))
            traj.store.alias((k, "v_prev"), (k, "g_true"))
            traj.store.alias((k, "prev_r"), (k, "r"))
            if full:
                traj.store.alias((k, "residual"), (k, "r"))
            for name in ("r", "v_true", "v_cached", "g_used", "g_true"):
                traj.put(k, name, None)

    traj.store.clear()
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

    # total: the usual number of probes (each a whole calibration pass, or less when it is over budget early)
    bar = tqdm(desc=f"closed-loop bisection (target {target} full steps)", total=bisection_probes(),
               disable=not progress, unit="probe")

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
