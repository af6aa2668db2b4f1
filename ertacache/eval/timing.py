"""Wall-clock measurements as ratios inside one process (these machines are noisy).

c = cached-step / full-step time at batch 1; the ideal speedup of a schedule
with N_full of T steps full is T / (N_full + (T - N_full) * c); the measured
speedup is uncached / cached end-to-end time (text encoding, noise, the
denoising loop and decoding of one video), medians over interleaved repeats so
that drift in machine load hits both sides alike. The clock is
:mod:`ertacache.timing` (CUDA events on a GPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from ertacache.models.images import images_for
from ertacache.sampling.sampler import CachedSampler, initial_latents
from ertacache.timing import ideal_speedup, interleaved_medians, machine_info

__all__ = ["sampler_step_costs", "end_to_end", "wallclock_table", "ideal_speedup", "machine_info"]


def sampler_step_costs(sampler: CachedSampler, bundle, settings, prompt: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one full and one cached step of ``sampler`` (batch 1, CFG as configured)."""
    shape = bundle.latent_shape(settings.frames, settings.height, settings.width)
    x = initial_latents(shape, [0], bundle.device)
    size = settings.video_size
    text = bundle.encode([prompt], settings.negative_prompt, sampler.tables.n_branches,
                         images_for(bundle.family, 1, size=size), size)
    g = torch.tensor(settings.guidance_scale, device=bundle.device)
    step = torch.tensor(1, device=bundle.device)
    with torch.no_grad():
        _, residual = sampler.full_step(x, torch.tensor(0, device=bundle.device), text, g)
        slots = (residual,) * sampler.tables.history  # the cached step reads K residual slots
        med = interleaved_medians({"full": lambda: sampler.full_step(x, step, text, g),
                                   "cached": lambda: sampler.cached_step(x, step, text, g, *slots)},
                                  repeats * 5, warmup=2, device=bundle.device)
    return med["full"], med["cached"]


def end_to_end(ctx, plan, prompt: str, seed: int) -> Callable[[], object]:
    """A closure generating one video with ``plan``: encode, noise, sample, decode."""

    def run():
        samples = ctx.samples([prompt], [seed])
        with torch.no_grad():
            out = plan.sample(ctx.bundle.adapter, samples.noise, samples.text, ctx.settings.guidance_scale)
            return ctx.bundle.decoder.decode(out.latents)

    return run


def wallclock_table(ctx, plans: dict[float, object], repeats: int = 5) -> dict:
    """Cached vs uncached end-to-end at each speedup, with c and the ideal bound from the same run."""
    prompt, seed = ctx.held_out.prompts[0], ctx.held_out.seeds[0]
    first = next(iter(plans.values()))
    sampler = CachedSampler(ctx.bundle.adapter, first.tables, first.mask)
    full_s, cached_s = sampler_step_costs(sampler, ctx.bundle, ctx.settings, prompt, repeats)
    c = cached_s / full_s
    runs = {"uncached": end_to_end(ctx, ctx.uncached_plan(), prompt, seed)}
    runs.update({s: end_to_end(ctx, p, prompt, seed) for s, p in plans.items()})
    med = interleaved_medians(runs, repeats, warmup=1, device=ctx.bundle.device)  # load drift hits every column alike
    rows = []
    for s, plan in plans.items():
        ideal = ideal_speedup(ctx.steps, plan.full_steps, c)
        measured = med["uncached"] / med[s]
        rows.append({"speedup_target": s, "full_steps": plan.full_steps, "uncached_s": med["uncached"],
                     "cached_s": med[s], "speedup_measured": measured, "speedup_ideal": ideal,
                     "measured_over_ideal": measured / ideal})
    return {"full_step_ms": 1e3 * full_s, "cached_step_ms": 1e3 * cached_s, "c": c, "repeats": repeats,
            "batch": 1, "prompt": prompt, "seed": seed, "rows": rows}
