"""TeaCache-style baseline: per-sample run-time reuse from the modulated input's change.

Published rule (TeaCache, Liu et al. 2025), written here from its description:
at every step compute only the timestep-modulated input of the first block
(cheap), take its relative L1 change since the previous step, rescale it with a
polynomial fitted offline (input change -> model output change), and add it to
an accumulator. While the accumulator stays below a threshold the step reuses
the cached residual; otherwise it computes the block stack and resets the
accumulator. The first and last steps always compute. Decisions are per sample
and data-dependent, which is exactly what ERTACache's static schedule avoids;
this module therefore has its own sampling loop, built from the same step
functions as the product's sampler.

The threshold is solved for the budget on the calibration set: an open-loop
search on the recorded uncached trajectories gives a start, and a few
closed-loop probes (the real rule run on the calibration prompts) refine it.
A per-sample rule cannot hit an integer budget exactly; the held-out mean
full-step count is reported with every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ertacache.eval.config import TeaCacheConfig
from ertacache.eval.plans import PlanOutput
from ertacache.eval.record import CalibrationRecord
from ertacache.models.family import ROWS_PER_BRANCH, ROWS_PER_SAMPLE
from ertacache.profile.calibrate import CalibrationSet, rel_l1_per_sample
from ertacache.profile.schedule import forced_full
from ertacache.sampling.steps import (
    StepTables, cached_velocity, combine_cfg, conditioning_dtype, euler, expand_branches, full_velocity, model_timestep,
    step_conditioning, timestep_scale,
)


@dataclass
class Rescaler:
    """Polynomial (highest power first, numpy convention), clipped at 0: a change is never negative."""

    coefficients: list[float]

    def __call__(self, x):
        return np.clip(np.polyval(self.coefficients, x), 0.0, None)


def fit_rescaler(record: CalibrationRecord, degree: int) -> Rescaler:
    """Least-squares polynomial from modulated-input change to output change, all calibration pairs."""
    x = record.mod_change[:, 1:].ravel()
    y = record.out_change[:, 1:].ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    degree = min(degree, max(1, int(keep.sum()) - 1))  # a tiny calibration set cannot carry degree 4
    return Rescaler([float(c) for c in np.polyfit(x[keep], y[keep], degree)])


def decide(acc: np.ndarray, change: np.ndarray | None, forced: bool, rescaler: Rescaler,
           threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One step of the rule for a batch: (compute (B,) bool, new accumulator (B,))."""
    if forced or change is None:
        return np.ones_like(acc, dtype=bool), np.zeros_like(acc)
    acc = acc + rescaler(change)
    compute = acc >= threshold
    return compute, np.where(compute, 0.0, acc)


def open_loop_counts(record: CalibrationRecord, rescaler: Rescaler, threshold: float,
                     forced: np.ndarray) -> np.ndarray:
    """(P,) full-step counts of the rule on the recorded *uncached* trajectories (no model calls)."""
    prompts, steps = record.mod_change.shape
    acc = np.zeros(prompts)
    counts = np.zeros(prompts)
    for i in range(steps):
        compute, acc = decide(acc, record.mod_change[:, i] if i else None, bool(forced[i]), rescaler, threshold)
        counts += compute
    return counts


def _rows(samples: np.ndarray, batch: int, n_branches: int) -> torch.Tensor:
    """Sample indices (k,) -> their rows in the branch-major (nb*B) layout, (nb*k,)."""
    idx = torch.as_tensor(samples, dtype=torch.long)
    return torch.cat([idx + b * batch for b in range(n_branches)])


@dataclass
class TeaCachePlan:
    """The run-time rule with a fixed threshold, over the nominal sigma table."""

    tables: StepTables
    rescaler: Rescaler
    threshold: float
    warmup_steps: int = 1
    final_steps: int = 1
    info_extra: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"threshold": self.threshold, "poly": self.rescaler.coefficients, **self.info_extra}

    @torch.no_grad()
    def sample(self, adapter, noise, text, guidance_scale) -> PlanOutput:
        nb, steps, batch = self.tables.n_branches, self.tables.steps, noise.shape[0]
        sig = self.tables.to(noise.device).sigmas
        forced = forced_full(steps, self.warmup_steps, self.final_steps)
        g = torch.tensor(float(guidance_scale), device=noise.device)
        x, residual, prev_mod = noise.float(), None, None
        scale = timestep_scale(adapter)  # the family's: the model embeds sigma * scale
        acc, computed = np.zeros(batch), np.zeros((batch, steps), dtype=bool)
        family = adapter.family
        for i in range(steps):
            x_in = expand_branches(x, nb).to(conditioning_dtype(text))  # (nb*B, C, [F,] H, W)
            rows = x_in.shape[0]
            t = model_timestep(sig[i], rows, scale)
            full_cond = step_conditioning(family, text, g, rows, cached=False)  # Wan: the text; FLUX: a mapping
            mod = adapter.modulated_input(adapter.pre(x_in, t, full_cond))  # (nb*B, N, D)
            change = None if prev_mod is None else rel_l1_per_sample(mod, prev_mod, nb).cpu().numpy()
            prev_mod = mod
            compute, acc = decide(acc, change, bool(forced[i]), self.rescaler, self.threshold)
            computed[:, i] = compute
            conds = (full_cond, step_conditioning(family, text, g, rows, cached=True))
            v, residual = self._velocity(adapter, x_in, t, conds, residual, compute, batch, nb)
            x = euler(x, combine_cfg(v, g, nb), sig[i], sig[i + 1])
        return PlanOutput(x, computed)

    @staticmethod
    def _velocity(adapter, x_in, t, conds, residual, compute, batch, nb):
        """Branch velocities (nb*B, ...): block stack on computing samples, cache on the others.

        conds: what a full and a cached ``pre`` read, each with one row per branch row (or None).
        """
        full_cond, cached_cond = conds
        v = torch.empty_like(x_in, dtype=torch.float32)
        full = _rows(np.flatnonzero(compute), batch, nb)
        if len(full):
            v_full, r_full = full_velocity(adapter, x_in[full], t[full], _select(adapter.family, full_cond, full, batch))
            v[full] = v_full
            if residual is None:
                residual = torch.zeros((x_in.shape[0], *r_full.shape[1:]), dtype=r_full.dtype, device=r_full.device)
            residual[full] = r_full
        reuse = _rows(np.flatnonzero(~compute), batch, nb)
        if len(reuse):
            v[reuse] = cached_velocity(adapter, x_in[reuse], t[reuse], residual[reuse],
                                       _select(adapter.family, cached_cond, reuse, batch))
        return v, residual


def _open_loop_threshold(record, rescaler, target, forced) -> float:
    """Threshold whose open-loop mean count is closest to ``target`` (log-space bisection)."""
    lo, hi = 1e-6, 1.0
    while open_loop_counts(record, rescaler, hi, forced).mean() > target and hi < 1e6:
        hi *= 2.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if open_loop_counts(record, rescaler, mid, forced).mean() > target:
            lo = mid
        else:
            hi = mid
    return hi


def _select(family, cond, rows, batch: int):
    """The conditioning of branch rows ``rows`` (indices into the nb*B rows): a tensor's rows; in a mapping, each
    input by its row rule: a per-branch input (and the per-row ``guidance``) those rows, a per-sample input
    (B rows: Wan I2V's image inputs) the rows of those rows' samples (``rows % B``), so each selected row keeps
    its own sample's image; a shared input as it is. None stays None."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    rules = {c.name: c.rows for c in family.conditioning}
    sample_rows = torch.as_tensor(rows) % batch
    out = {}
    for name, value in cond.items():
        rule = rules.get(name, ROWS_PER_BRANCH)  # "guidance": one value per row, like a branch input
        out[name] = value[rows] if rule == ROWS_PER_BRANCH else value[sample_rows] if rule == ROWS_PER_SAMPLE else value
    return out


def solve_teacache(cal: CalibrationSet, record: CalibrationRecord, target: int, config: TeaCacheConfig,
                   batch_size: int = 16) -> TeaCachePlan:
    """Fit the rescaler, then the threshold whose closed-loop calibration mean is nearest ``target``."""
    rescaler = fit_rescaler(record, config.poly_degree)
    forced = forced_full(cal.steps, config.warmup_steps, config.final_steps)
    tables = StepTables(cal.nominal_sigmas, n_branches=cal.n_branches, channels=cal.latents.shape[1])
    plan = TeaCachePlan(tables, rescaler, _open_loop_threshold(record, rescaler, target, forced),
                        config.warmup_steps, config.final_steps)
    open_guess = plan.threshold

    def mean_full(threshold: float) -> float:
        plan.threshold = threshold
        counts = [plan.sample(cal.adapter, cal.latent_rows(sl), cal.text_rows(sl), cal.guidance_scale).computed.sum(1)
                  for sl in cal.micro_batches(batch_size)]
        return float(np.concatenate(counts).mean())

    best = _closed_loop_search(mean_full, target, open_guess, config)
    plan.threshold = best[0]
    plan.info_extra = {"calibration_full_steps": best[1], "open_loop_threshold": open_guess, "probes": best[2]}
    return plan


def _closed_loop_search(mean_full, target: float, start: float, config: TeaCacheConfig):
    """Bracket and bisect (in log space) the threshold; returns (threshold, mean count, probes)."""
    lo, hi = None, None  # lo: count above target (too many full steps); hi: at or below
    best = None
    thr, probes = start, 0
    while probes < config.max_probes:
        n = mean_full(thr)
        probes += 1
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (thr, n)
        if abs(n - target) <= config.tolerance:
            break
        if n > target:
            lo = thr
        else:
            hi = thr
        thr = math.sqrt(lo * hi) if lo is not None and hi is not None else (thr * 1.5 if hi is None else thr / 1.5)
    return best[0], best[1], probes
