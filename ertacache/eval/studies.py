"""Studies around one ERTACache configuration (default: closed loop, all components, 2x).

    calibration_size   how many calibration prompts the profile needs (1, 4, 16, 64)
    lambda_sensitivity what lambda does around the solved value (full steps and fidelity)
    transfer           one profile on its own calibration samples, on new seeds, on unseen prompts
    batch              the same profile at batch 1, 4, ..., B: identical samples, throughput

Each returns a list of table rows (dicts). They reuse the context's calibration,
reference and candidates, so run after (or together with) the main evaluation.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ertacache.eval.fidelity import adherence, score
from ertacache.eval.harness import EvalContext
from ertacache.eval.methods import build_candidate, erta_candidate, erta_config

STUDIES: tuple[str, ...] = ("cal-size", "lambda", "transfer", "batch")


def _metrics(ctx: EvalContext, plan, samples=None, reference=None) -> dict:
    """Held-out metrics of ``plan`` (or on ``samples`` against ``reference``), without per-sample lists."""
    samples = ctx.held_out if samples is None else samples
    reference = ctx.reference if reference is None else reference
    run = ctx.run(plan, samples)
    out = score(reference.frames, run.frames, samples.prompts)
    out.pop("psnr_per_sample")
    out.pop("ssim_per_sample")
    return {"full_steps": float(run.computed.sum(1).mean()), **out, "wall_s": run.wall_s}


def study_prompts(ctx: EvalContext, n: int) -> list[str]:
    """n calibration prompts, nested across sizes (the first n of one list)."""
    from ertacache.eval.fidelity import prompt_judge

    base = list(ctx.config.calibration_prompts)
    judge = prompt_judge(base)
    if judge is not None:  # a testbed: its own balanced calibration list
        return judge.calibration_prompts(n)
    return (base * (n // len(base) + 1))[:n]


def calibration_size(ctx: EvalContext, method: str, speedup: float, sizes: Sequence[int] = (1, 4, 16, 64)) -> list[dict]:
    """Fidelity on the held-out set of profiles calibrated on 1, 4, 16, 64 prompts."""
    rows = []
    for n in sizes:
        cal = ctx.calibration_for(study_prompts(ctx, n))
        t0 = time.perf_counter()
        cand = erta_candidate(ctx, cal, erta_config(ctx, method, speedup))
        calib_s = time.perf_counter() - t0
        rows.append({"calibration_prompts": n, "lambda": cand.info["lambda"], **_metrics(ctx, cand.plan),
                     "calib_s": calib_s})
    return rows


def lambda_sensitivity(ctx: EvalContext, method: str, speedup: float,
                       factors: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> list[dict]:
    """Profiles at fixed lambda = factor x the lambda solved for ``speedup`` (no budget filling)."""
    lam_star = build_candidate(ctx, method, speedup).info["lambda"]
    rows = []
    for f in factors:
        cand = erta_candidate(ctx, ctx.calibration, erta_config(ctx, method, lam=lam_star * f))
        m = _metrics(ctx, cand.plan)
        rows.append({"factor": f, "lambda": lam_star * f, "speedup_steps": ctx.steps / m["full_steps"], **m})
    return rows


def transfer(ctx: EvalContext, method: str, speedup: float) -> list[dict]:
    """One profile scored on: its calibration samples, their prompts with new seeds, unseen prompts + seeds."""
    plan = build_candidate(ctx, method, speedup).plan
    cfg = ctx.config
    n = min(len(cfg.held_out_prompts), len(cfg.calibration_prompts))
    cal_prompts = list(cfg.calibration_prompts[:n])
    cal_seeds = [cfg.calibration_seed + k for k in range(n)]
    sets = [
        ("calibration prompts, calibration seeds (in-sample)", cal_prompts, cal_seeds),
        ("calibration prompts, held-out seeds", cal_prompts, list(cfg.held_out_seeds[:n])),
        ("held-out prompts, held-out seeds", list(cfg.held_out_prompts[:n]), list(cfg.held_out_seeds[:n])),
    ]
    seen = set(cfg.calibration_prompts)
    rows = []
    for name, prompts, seeds in sets:
        if prompts == ctx.held_out.prompts and seeds == ctx.held_out.seeds:
            samples, ref = ctx.held_out, ctx.reference  # the main evaluation's set: reuse its reference
        else:
            samples = ctx.samples(prompts, seeds)
            ref = ctx.reference_for(samples)
        m = _metrics(ctx, plan, samples, ref)
        rows.append({"set": name, "samples": n, "unseen_prompts": sum(p not in seen for p in prompts),
                     **{f"{k}_uncached": v for k, v in adherence(ref.frames, prompts).items()}, **m})
    return rows


def batch(ctx: EvalContext, method: str, speedup: float, sizes: Sequence[int] = (1, 4, 8), samples: int = 8
          ) -> list[dict]:
    """The same samples at several batch sizes: max deviation from batch 1, PSNR, seconds per sample."""
    plan = build_candidate(ctx, method, speedup).plan
    subset = ctx.held_out.subset(min(samples, len(ctx.held_out)))
    ref = ctx.reference_for(subset)
    rows, base = [], None
    for b in dict.fromkeys(min(b, len(subset)) for b in sizes):  # clamped, without repeats
        run = ctx.run(plan, subset, batch_size=b)
        uncached = ctx.run(ctx.uncached_plan(), subset, batch_size=b)
        base = run.latents if base is None else base
        m = score(ref.frames, run.frames, subset.prompts)
        rows.append({"batch": b, "samples": len(subset),
                     "max_abs_diff_vs_batch1": float((run.latents - base).abs().max()),
                     "psnr": m["psnr"], "psnr_worst": m["psnr_worst"], "psnr_pooled": m["psnr_pooled"],
                     "ssim": m["ssim"], "ssim_worst": m["ssim_worst"],
                     "cached_s_per_sample": run.wall_s / len(subset),
                     "uncached_s_per_sample": uncached.wall_s / len(subset),
                     "speedup": uncached.wall_s / run.wall_s})
    return rows


def run_studies(ctx: EvalContext, names: Sequence[str], method: str, speedup: float,
                cal_sizes: Sequence[int] = (1, 4, 16, 64)) -> dict[str, list[dict]]:
    out = {}
    with torch.no_grad():
        for name in names:
            ctx.log(f"study: {name}")
            if name == "cal-size":
                out[name] = calibration_size(ctx, method, speedup, cal_sizes)
            elif name == "lambda":
                out[name] = lambda_sensitivity(ctx, method, speedup)
            elif name == "transfer":
                out[name] = transfer(ctx, method, speedup)
            elif name == "batch":
                out[name] = batch(ctx, method, speedup)
            else:
                raise ValueError(f"unknown study {name!r}; choose from {STUDIES}")
    return out
