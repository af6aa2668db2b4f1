"""The (method x speedup) evaluation loop and the state its runs share.

:class:`EvalContext` owns what every row reuses, each computed once on first
use: the calibration set, the uncached calibration record, the held-out noise
and text, and the uncached reference samples. A row is then: build the
method's plan for the budget round(T / speedup) (timed as calibration), sample
the held-out set with it (timed), decode, and score against the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ertacache.eval.config import EvalConfig, full_step_budget, method_label
from ertacache.eval.fidelity import adherence, score
from ertacache.eval.plans import Plan, StaticPlan, plain_tables
from ertacache.eval.record import CalibrationRecord, record_calibration
from ertacache.models.family import ModelFamily
from ertacache.models.images import images_for
from ertacache.models.loading import ModelBundle
from ertacache.profile.build import calibration_set
from ertacache.profile.calibrate import CalibrationSet
from ertacache.profile.schedule import mask_summary
from ertacache.sampling.sampler import initial_latents
from ertacache.sampling.sigmas import request_sigmas
from ertacache.sampling.settings import SampleSettings
from ertacache.sampling.steps import Conditioning, conditioning_rows


@dataclass
class SampleSet:
    """Prompts and seeds to sample, with their noise (B, C, [F,] H, W) and conditioning.

    text: (nb*B, L, D) for a one-tensor family (Wan), else a mapping by the family's input names.
    """

    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor
    text: Conditioning
    family: ModelFamily
    n_branches: int  # rows per sample of the branch-wise inputs (2 with CFG)

    def __len__(self) -> int:
        return len(self.prompts)

    def chunk(self, sl: slice) -> tuple[torch.Tensor, Conditioning]:
        """Noise (b, ...) and the conditioning rows of samples ``sl`` (cond then uncond rows, (nb*b, L, D))."""
        return self.noise[sl], conditioning_rows(self.family, self.text, sl, self.n_branches, len(self))

    def subset(self, n: int) -> "SampleSet":
        noise, text = self.chunk(slice(0, n))
        return SampleSet(self.prompts[:n], self.seeds[:n], noise, text, self.family, self.n_branches)


@dataclass
class Run:
    """One plan sampled over a SampleSet."""

    latents: torch.Tensor  # (B, C, F, H, W)
    frames: np.ndarray  # (B, F, H, W, 3) uint8
    computed: np.ndarray  # (B, T_plan) bool
    wall_s: float  # denoising loops only (text encoding and decoding excluded)
    block_equivalents: np.ndarray | None = None  # (B,) where measured (peers), else None


class EvalContext:
    """Shared, lazily computed state of one evaluation (see the module docstring)."""

    def __init__(self, bundle: ModelBundle, settings: SampleSettings, config: EvalConfig, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.bundle, self.settings, self.config = bundle, settings, config
        self.progress, self.log = progress, log
        #: (method, speedup) -> Candidate, for reuse; also other per-context results keyed by a tuple
        self.candidates: dict[tuple, object] = {}

    # ---- shared inputs -------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return self.settings.steps

    @property
    def channels(self) -> int:
        return self.latent_shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        s = self.settings
        return self.bundle.latent_shape(s.frames, s.height, s.width)

    def budget(self, speedup: float) -> int:
        return full_step_budget(self.steps, speedup)

    def calibration_for(self, prompts: Sequence[str], seed: int | None = None) -> CalibrationSet:
        seed = self.config.calibration_seed if seed is None else seed
        return calibration_set(self.bundle, list(prompts), self.settings, seed)

    @cached_property
    def calibration(self) -> CalibrationSet:
        return self.calibration_for(self.config.calibration_prompts)

    @cached_property
    def record(self) -> CalibrationRecord:
        self.log(f"recording {self.calibration.prompts} uncached calibration trajectories")
        return record_calibration(self.calibration, self.config.calibration_batch_size, self.progress)

    def samples(self, prompts: Sequence[str], seeds: Sequence[int]) -> SampleSet:
        noise = initial_latents(self.latent_shape, list(seeds), self.bundle.device)
        s = self.settings
        images = images_for(self.bundle.family, len(prompts), held_out=True, size=s.video_size)  # None: text-only
        text = self.bundle.encode(list(prompts), s.negative_prompt, s.n_branches, images, s.video_size)
        return SampleSet(list(prompts), [int(s) for s in seeds], noise, text, self.bundle.family,
                         self.settings.n_branches)

    @cached_property
    def held_out(self) -> SampleSet:
        return self.samples(self.config.held_out_prompts, self.config.held_out_seeds)

    def uncached_plan(self) -> StaticPlan:
        sig = request_sigmas(self.bundle, self.settings)  # the family's table at this size
        return StaticPlan(tuple([True] * self.steps), plain_tables(sig, self.settings.n_branches, self.channels))

    @cached_property
    def reference(self) -> Run:
        """The uncached T-step samples of the held-out set: what every method is scored against."""
        return self.run(self.uncached_plan(), self.held_out)

    # ---- running plans -------------------------------------------------------------------------

    def run(self, plan: Plan, samples: SampleSet, batch_size: int | None = None) -> Run:
        """Sample ``samples`` with ``plan`` in micro-batches, then decode."""
        size = batch_size or self.config.batch_size
        latents, computed, blocks, wall = [], [], [], 0.0
        for start in range(0, len(samples), size):
            noise, text = samples.chunk(slice(start, start + size))
            t0 = time.perf_counter()
            out = plan.sample(self.bundle.adapter, noise, text, self.settings.guidance_scale)
            if noise.device.type == "cuda":
                torch.cuda.synchronize(noise.device)
            wall += time.perf_counter() - t0
            latents.append(out.latents)
            computed.append(out.computed)
            blocks.append(out.block_equivalents)
        lat = torch.cat(latents)
        frames = self.bundle.decoder.decode(lat).cpu().numpy()
        block_eq = None if any(b is None for b in blocks) else np.concatenate(blocks)
        return Run(lat, frames, np.concatenate(computed), wall, block_eq)

    def calibration_reference(self, prompts: int) -> torch.Tensor:
        """Uncached final latents (n, C, F, H, W) of the first ``prompts`` calibration prompts (peer tuning)."""
        key = ("calibration-reference", prompts)
        if key not in self.candidates:
            cal = self.calibration
            noise, text = cal.latent_rows(slice(0, prompts)), cal.text_rows(slice(0, prompts))
            self.candidates[key] = self.uncached_plan().sample(self.bundle.adapter, noise, text,
                                                               cal.guidance_scale).latents
        return self.candidates[key]

    def reference_for(self, samples: SampleSet) -> Run:
        """Uncached samples of another prompt/seed set (studies)."""
        return self.run(self.uncached_plan(), samples)


def grid_schedule(plan: Plan, run: Run) -> list[float]:
    """Fraction of samples computing at each of the T grid steps (1/0 for static plans)."""
    if isinstance(plan, StaticPlan):
        return [float(m) for m in plan.grid_mask]
    return [float(x) for x in run.computed.mean(axis=0)]


def evaluate(ctx: EvalContext, method: str, speedup: float) -> tuple[dict, Run]:
    """One held-out result row: build the plan for the budget, sample, score. Returns (row, run)."""
    from ertacache.eval.methods import build_candidate

    samples, reference = ctx.held_out, ctx.reference
    budget = ctx.budget(speedup)
    t0 = time.perf_counter()
    cand = build_candidate(ctx, method, speedup)
    calib_s = time.perf_counter() - t0
    run = ctx.run(cand.plan, samples)
    counts = run.computed.sum(axis=1)
    row = {
        "method": method,
        "implementation": method_label(method),
        "speedup_target": speedup,
        "budget": budget,
        "full_steps": float(counts.mean()),
        "full_steps_range": [int(counts.min()), int(counts.max())],
        "steps": ctx.steps,
        **score(reference.frames, run.frames, samples.prompts),
        "lpips": None,
        "wall_s": run.wall_s,
        "calib_s": calib_s,
        "info": cand.info,
        "schedule": grid_schedule(cand.plan, run),
    }
    if run.block_equivalents is not None:  # blocks that really ran, probe blocks included (whole-stack units)
        be = run.block_equivalents
        row["block_equivalents"] = float(be.mean())
        row["block_equivalents_range"] = [float(be.min()), float(be.max())]
    if isinstance(cand.plan, StaticPlan):
        row["mask"] = mask_summary(cand.plan.mask)
    return row, run


def reference_row(ctx: EvalContext) -> dict:
    """The uncached row: what 'no caching' scores on the judge (PSNR/SSIM are against itself)."""
    ref = ctx.reference
    return {"method": "uncached", "implementation": "uncached reference", "speedup_target": 1.0, "budget": ctx.steps, "full_steps": float(ctx.steps),
            "full_steps_range": [ctx.steps, ctx.steps], "steps": ctx.steps, "psnr": None, "ssim": None, "psnr_worst": None, "ssim_worst": None,
            "psnr_pooled": None,
            **adherence(ref.frames, ctx.held_out.prompts), "lpips": None, "wall_s": ref.wall_s, "calib_s": 0.0,
            "info": {}, "schedule": [1.0] * ctx.steps}


@dataclass
class EvalResult:
    rows: list[dict]
    frames: dict[tuple[str, float], np.ndarray]  # first held-out video of every row: (F, H, W, 3) uint8
    record: CalibrationRecord


def run_eval(ctx: EvalContext) -> EvalResult:
    """Every (method, speedup) of the config, with a progress bar; the uncached row first."""
    cfg = ctx.config
    jobs = [(m, s) for s in cfg.speedups for m in cfg.methods]
    bar = tqdm(total=len(jobs) + 1, desc="ertacache-eval", unit="row", disable=not ctx.progress)
    bar.set_postfix_str("uncached reference + calibration record")
    rows = [reference_row(ctx)]
    record = ctx.record  # shared by several methods: measured once, outside any row's calib_s
    frames = {("uncached", 1.0): ctx.reference.frames[0]}
    bar.update()
    for method, speedup in jobs:
        bar.set_postfix_str(f"{method} @ {speedup:g}x")
        row, run = evaluate(ctx, method, speedup)
        rows.append(row)
        frames[(method, speedup)] = run.frames[0]
        bar.update()
    bar.close()
    return EvalResult(rows, frames, record)


__all__ = ["EvalContext", "EvalResult", "Run", "SampleSet", "evaluate", "run_eval"]
