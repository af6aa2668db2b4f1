"""ertacache-generate: one video from a prompt, cached (with a profile) or not."""

from __future__ import annotations

import argparse

from ertacache.cli.common import (add_image_arg, add_model_args, add_shape_args, apply_threads, new_parser, pick_device,
                                  read_images, run_cli)
from ertacache.cli.validate import check_args, check_out_video, loading_model
from ertacache.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-generate", description="Generate a video, with or without ERTACache.")
    add_model_args(p)
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--profile", default=None, help="profile folder from ertacache-profile (cached sampling)")
    cache.add_argument("--no-cache", action="store_true",
                       help="plain sampling, every step computes (what happens without --profile; the flag only "
                            "says so explicitly)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (with --profile: the profile's)")
    add_shape_args(p)
    p.add_argument("--prompt", required=True, help="text prompt")
    add_image_arg(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out", required=True, help="output file: .gif, .mp4 or .png (frames side by side)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _settings(args, recipe, profile):
    """The run's settings from the recipe or the profile; refuses flags the model cannot take (before it loads)."""
    from ertacache.sampling.settings import SampleSettings, check_frames_flag

    check_frames_flag(recipe, args.frames)  # an image model takes no --frames

    if profile is None:
        return SampleSettings.from_recipe(
            recipe, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
            shift=args.shift, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
            guidance_scale_2=args.guidance_scale_2,
        )
    for flag, value, have in (("--steps", args.steps, profile.steps), ("--height", args.height, profile.height),
                              ("--width", args.width, profile.width), ("--frames", args.frames, profile.frames),
                              ("--shift", args.shift, profile.shift)):
        if value is not None and value != have:
            raise UserError(f"{flag} {value} conflicts with the profile ({flag} {have}); drop the flag or "
                            "make a new profile with ertacache-profile")
    settings = SampleSettings(
        profile.height, profile.width, profile.frames, profile.steps, profile.shift,
        args.guidance_scale if args.guidance_scale is not None else profile.guidance_scale,
        args.negative_prompt if args.negative_prompt is not None else profile.calibration.get("negative_prompt", ""),
        guidance=profile.guidance,
        guidance_scale_2=args.guidance_scale_2 if args.guidance_scale_2 is not None else
        (profile.experts.guidance_scales[1] if profile.experts is not None else None),
    )
    if settings.n_branches != profile.n_branches:
        raise UserError(f"--guidance-scale {settings.guidance_scale} turns CFG "
                        f"{'on' if settings.n_branches == 2 else 'off'} but the profile was calibrated with it "
                        f"{'on' if profile.n_branches == 2 else 'off'}")
    return settings


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    check_out_video(check_args(args).out, args.force)  # before loading or sampling anything
    apply_threads(args.threads)
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.generation import generate
    from ertacache.video import output_kind, save_video

    profile = load_profile(args.profile) if args.profile else None
    if profile is not None and profile.model != args.model:
        raise UserError(f"the profile was made for --model {profile.model}, not {args.model}; pass --model "
                        f"{profile.model} or profile {args.model}")
    from ertacache.models.recipes import load_recipe

    recipe = load_recipe(args.model)
    settings = _settings(args, recipe, profile)
    images = read_images(recipe, args.image, required=True)  # before the model loads
    with loading_model(args.model, args.model_path):
        bundle = load_bundle(args.model, args.model_path, pick_device(args.device), args.dtype)
    result = generate(bundle, [args.prompt], [args.seed], settings, profile, images=images)
    out = save_video(result.frames[0].cpu().numpy(), args.out, overwrite=args.force)
    mode = f"cached ({args.profile})" if profile is not None else "uncached"
    print(f"{mode}: {result.full_steps}/{result.steps} full steps, sampling {result.sample_s:.2f} s wall")
    print(f"{output_kind(result.frames.shape[1])} written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
