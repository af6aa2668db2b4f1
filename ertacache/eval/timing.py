"""Wall-clock measurements as ratios inside one process (these machines are noisy).

c = cached-step / full-step time at batch 1; the ideal speedup of a schedule
with N_full of T steps full is T / (N_full + (T - N_full) * c); the measured
speedup is uncached / cached end-to-end time (text encoding, noise, the
denoising loop and decoding of one video), medians over interleaved repeats so
that drift in machine load hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ertacache.sampling.sampler import CachedSampler, initial_latents


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampler_step_costs(sampler: CachedSampler, bundle, settings, prompt: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one full and one cached step of ``sampler`` (batch 1, CFG as configured)."""
    shape = bundle.latent_shape(settings.frames, settings.height, settings.width)
    x = initial_latents(shape, [0], bundle.device)
    text = bundle.encode([prompt], settings.negative_prompt, sampler.tables.n_branches)
    g = torch.tensor(settings.guidance_scale)
    step = torch.tensor(1)
    with torch.no_grad():
        _, residual = sampler.full_step(x, torch.tensor(0), text, g)
        full = median_time(lambda: sampler.full_step(x, step, text, g), repeats * 5)
        cached = median_time(lambda: sampler.cached_step(x, step, text, g, residual), repeats * 5)
    return full, cached


def ideal_speedup(steps: int, full_steps: float, c: float) -> float:
    """T / (N_full + N_cached * c): the speedup if nothing but the step costs mattered."""
    return steps / (full_steps + (steps - full_steps) * c)


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
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: load drift hits every column alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for s, plan in plans.items():
        ideal = ideal_speedup(ctx.steps, plan.full_steps, c)
        measured = med["uncached"] / med[s]
        rows.append({"speedup_target": s, "full_steps": plan.full_steps, "uncached_s": med["uncached"],
                     "cached_s": med[s], "speedup_measured": measured, "speedup_ideal": ideal,
                     "measured_over_ideal": measured / ideal})
    return {"full_step_ms": 1e3 * full_s, "cached_step_ms": 1e3 * cached_s, "c": c, "repeats": repeats,
            "batch": 1, "prompt": prompt, "seed": seed, "rows": rows}


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What produced a timing: CPU model, core count, OS, torch build and threads."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
