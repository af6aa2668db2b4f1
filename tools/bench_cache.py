#!/usr/bin/env python
"""Benchmark eager ERTACache on one model: step costs, end-to-end speedup vs the ideal bound, fidelity.

All timings are medians of repeated runs inside one process, reported as ratios (these machines
are noisy): c = cached-step / full-step time, measured speedup = uncached / cached wall time of the
whole denoising loop, ideal bound = T / (N_full + N_cached * c).

    python tools/bench_cache.py --model wan2.1-tiny --profile engines/demo/profile --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import numpy as np
import torch

from ertacache.cli.common import pick_device
from ertacache.eval.timing import sampler_step_costs
from ertacache.timing import median_seconds
from ertacache.metrics import psnr, ssim
from ertacache.models.loading import load_bundle
from ertacache.profile.artifact import load_profile
from ertacache.profile.build import build_profile
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.schedule import mask_summary
from ertacache.generation import generate, sampler_for
from ertacache.sampling.settings import SampleSettings


def step_costs(bundle, settings, profile, repeats):
    """Median seconds of one full and one cached step (batch 1, CFG as profiled)."""
    prompt = "digit 3 moving left" if bundle.model_id == "wan2.1-tiny" else "a cat"
    return sampler_step_costs(sampler_for(bundle, settings, profile), bundle, settings, prompt, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan2.1-tiny")
    p.add_argument("--model-path", default=None)
    p.add_argument("--profile", default=None, help="profile folder (default: calibrate one with --speedup)")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompts", nargs="*", default=None, help="held-out prompts (default: the testbed's)")
    p.add_argument("--seeds", type=int, nargs="*", default=[1000, 1001, 1002, 1003])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    bundle = load_bundle(args.model, args.model_path, pick_device(args.device))
    if args.profile:
        profile = load_profile(args.profile)
        settings = SampleSettings(profile.height, profile.width, profile.frames, profile.steps, profile.shift,
                                  profile.guidance_scale, profile.calibration.get("negative_prompt", ""))
    else:
        settings = SampleSettings.from_recipe(bundle.recipe, steps=args.steps)
        profile = build_profile(bundle, CalibrationConfig(speedup=args.speedup,
                                                          batch_size=bundle.recipe.defaults.calibration_batch_size),
                                settings, list(bundle.recipe.calibration_prompts))
    prompts = args.prompts
    if prompts is None:
        from ertacache.testbed import held_out_prompts

        prompts = held_out_prompts(len(args.seeds))
    prompts = (prompts * len(args.seeds))[: len(args.seeds)]

    full_s, cached_s = step_costs(bundle, settings, profile, args.repeats)
    c = cached_s / full_s
    t, n_full = profile.steps, profile.full_steps
    ideal = t / (n_full + (t - n_full) * c)

    one = ([prompts[0]], [args.seeds[0]])
    uncached_s = median_seconds(lambda: generate(bundle, *one, settings, None, decode=False), args.repeats, warmup=1)
    cached_e2e = median_seconds(lambda: generate(bundle, *one, settings, profile, decode=False), args.repeats, warmup=1)
    measured = uncached_s / cached_e2e

    ref = generate(bundle, prompts, args.seeds, settings, None)
    out = generate(bundle, prompts, args.seeds, settings, profile)
    fid = [(psnr(r, o), ssim(r, o)) for r, o in zip(ref.frames.cpu().numpy(), out.frames.cpu().numpy())]
    rows = {
        "model": bundle.model_id,
        "steps": t,
        "full_steps": n_full,
        "mask": mask_summary(profile.mask),
        "lambda": profile.lam,
        "full_step_ms": 1e3 * full_s,
        "cached_step_ms": 1e3 * cached_s,
        "c": c,
        "uncached_s": uncached_s,
        "cached_s": cached_e2e,
        "speedup_measured": measured,
        "speedup_ideal": ideal,
        "measured_over_ideal": measured / ideal,
        "psnr_db_mean": float(np.mean([f[0] for f in fid])),
        "ssim_mean": float(np.mean([f[1] for f in fid])),
        "per_sample": [{"prompt": pr, "seed": s, "psnr": f[0], "ssim": f[1]} for pr, s, f in zip(prompts, args.seeds, fid)],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(bundle.device)},
        "command": " ".join(["python"] + sys.argv),
    }
    if bundle.model_id == "wan2.1-tiny":
        from ertacache.testbed import frame_digit_accuracy, motion_accuracy, parse_prompt

        digits = [parse_prompt(pr)[0] for pr in prompts]
        dirs = [parse_prompt(pr)[1] for pr in prompts]
        rows["digit_acc_uncached"] = frame_digit_accuracy(ref.frames, digits)
        rows["digit_acc_cached"] = frame_digit_accuracy(out.frames, digits)
        rows["motion_acc_uncached"] = motion_accuracy(ref.frames, dirs)
        rows["motion_acc_cached"] = motion_accuracy(out.frames, dirs)
    for k, v in rows.items():
        if k not in ("per_sample", "machine"):
            print(f"{k:22s} {v:.4g}" if isinstance(v, float) else f"{k:22s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
