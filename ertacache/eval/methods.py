"""Method registry: name -> the plan it samples with, for a target speedup.

Every builder receives the shared :class:`EvalContext` and the speedup, and
must return a plan whose full-step count is the budget round(T / speedup):
exactly for the static methods, as the calibration mean for the per-sample
rules (TeaCache-style, and the dynamic peers of :mod:`ertacache.eval.peers`). Adding a method is one decorated function here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ertacache.eval.config import ERTA_METHODS, PEER_METHODS, PREDICTOR_METHODS, erta_flags, erta_predictor
from ertacache.eval.plans import Plan, StaticPlan, fewer_steps_plan, reuse_plan, uniform_mask
from ertacache.eval.teacache import solve_teacache
from ertacache.profile.calibrate import calibrate
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.predictor import PredictorConfig
from ertacache.profile.schedule import mask_from_error_matrix, solve_lambda
from ertacache.sampling.sigmas import request_sigmas


@dataclass
class Candidate:
    """A method's plan for one budget, with what it solved (threshold, lambda, K, ...)."""

    plan: Plan
    info: dict


#: builder(ctx: EvalContext, method, speedup) -> Candidate
Builder = Callable[[object, str, float], Candidate]
_BUILDERS: dict[str, Builder] = {}


def register(*names: str) -> Callable[[Builder], Builder]:
    def decorator(fn: Builder) -> Builder:
        for name in names:
            _BUILDERS[name] = fn
        return fn

    return decorator


def build_candidate(ctx, method: str, speedup: float) -> Candidate:
    """The method's candidate, built once per (method, speedup) and kept on the context for reuse."""
    key = (method, float(speedup))
    if key not in ctx.candidates:
        ctx.candidates[key] = _BUILDERS[method](ctx, method, float(speedup))
    return ctx.candidates[key]


@register("fewer-steps")
def _fewer_steps(ctx, method, speedup) -> Candidate:
    n = ctx.budget(speedup)
    plan = fewer_steps_plan(ctx.steps, n, ctx.settings.shift, ctx.settings.n_branches, ctx.channels,
                            table=lambda k: request_sigmas(ctx.bundle, ctx.settings, steps=k))
    return Candidate(plan, {"sampling_steps": n})


@register("uniform")
def _uniform(ctx, method, speedup) -> Candidate:
    mask = uniform_mask(ctx.steps, ctx.budget(speedup))
    return Candidate(reuse_plan(mask, ctx.calibration.nominal_sigmas, ctx.settings.n_branches, ctx.channels), {})


@register("teacache")
def _teacache(ctx, method, speedup) -> Candidate:
    plan = solve_teacache(ctx.calibration, ctx.record, ctx.budget(speedup), ctx.config.teacache,
                          ctx.config.calibration_batch_size)
    return Candidate(plan, plan.info())


def erta_config(ctx, method: str, speedup: float | None = None, lam: float | None = None) -> CalibrationConfig:
    """The CalibrationConfig an ERTACache method name stands for (the same flags as ertacache-profile)."""
    loop, time_adjust, rectify = erta_flags(method)
    kind, order = erta_predictor(method)
    predictor = PredictorConfig(kind=kind, order=order, curvature=ctx.config.curvature)
    return CalibrationConfig(lam=lam, speedup=speedup if lam is None else None, loop=loop,
                             warmup_steps=ctx.config.warmup_steps, time_adjust=time_adjust,
                             rectify=rectify, predictor=predictor, phi_rule=ctx.config.phi_rule,
                             schedule_weight=ctx.config.schedule_weight,
                             batch_size=ctx.config.calibration_batch_size)


def closed_loop_start(ctx, config: CalibrationConfig) -> float:
    """Twice the open-loop lambda for the same budget (free from the record): where closed-loop bisection starts.

    Closed-loop errors run above open-loop ones, so this usually brackets the
    answer at once instead of after several whole-pass halvings from 1.
    """
    if config.speedup is None:
        return 1.0
    target = config.target_full_steps(ctx.steps)

    def probe(lam):
        mask = mask_from_error_matrix(ctx.record.errors, lam, config.warmup_steps, config.final_steps)
        return sum(mask), None

    lam_open = solve_lambda(probe, target)[0]
    return 2.0 * lam_open if lam_open > 0 else 1.0


def erta_candidate(ctx, cal, config: CalibrationConfig) -> Candidate:
    """Calibrate on ``cal`` (sharing the recorded open-loop error matrix when it is ctx's set)."""
    errors = ctx.record.errors if config.loop == "open" and cal is ctx.calibration else None
    lam_hi = closed_loop_start(ctx, config) if config.loop == "closed" else 1.0
    outcome = calibrate(cal, config, progress=False, log=lambda s: None, errors=errors, lam_hi=lam_hi)
    res = outcome.result
    plan = StaticPlan(res.mask, res.tables())
    reused = ~np.asarray(res.mask)
    info = {"lambda": float(outcome.lam), "phi_min": float(res.phi[reused].min()) if reused.any() else 1.0,
            "phi_max": float(res.phi[reused].max()) if reused.any() else 1.0, "phi_at_bound": res.phi_at_bound,
            "calibration_prompts": cal.prompts, "uncached_passes": round(outcome.uncached_passes, 2)}
    return Candidate(plan, info)


@register(*ERTA_METHODS, *PREDICTOR_METHODS)
def _erta(ctx, method, speedup) -> Candidate:
    return erta_candidate(ctx, ctx.calibration, erta_config(ctx, method, speedup))


@register(*PEER_METHODS)
def _peer(ctx, method, speedup) -> Candidate:
    from ertacache.eval.peers import solve_peer  # the peer libraries load only when a peer is asked for

    cand = solve_peer(ctx, method, ctx.budget(speedup))
    return Candidate(cand.plan, cand.info)


def registered_methods() -> tuple[str, ...]:
    return tuple(_BUILDERS)
