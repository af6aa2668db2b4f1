"""ertacache-profile: calibrate a model and write a profile folder."""

from __future__ import annotations

import argparse

from ertacache.cli.common import (add_calibration_args, add_image_arg, add_model_args, add_shape_args, apply_threads,
                                  calibration_config, new_parser, pick_device, read_images, run_cli)
from ertacache.cli.validate import check_args, check_out_folder, loading_model


def parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="ertacache-profile",
        description="Calibrate ERTACache offline: reuse mask, adjusted sigmas and residual correction.",
    )
    add_model_args(p)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: recipe)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, default=None,
                        help="target T / N_full; lambda is solved by bisection (default: recipe, 2.0)")
    target.add_argument("--lambda", dest="lam", type=float, default=None, help="reuse threshold lambda (>= 0)")
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: recipe's set)")
    add_shape_args(p)
    add_image_arg(p, calibration=True)
    add_calibration_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="calibration prompts per model call")
    p.add_argument("--seed", type=int, default=0, help="first calibration seed (prompt k uses seed + k)")
    p.add_argument("--out", default=None,
                   help="profile folder to write (default: engines/<model>-profile; pass it to the other "
                        "commands' --profile)")
    p.add_argument("--force", action="store_true", help="replace an existing profile folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    from ertacache.profile.artifact import is_profile_folder

    args.out = args.out or f"engines/{args.model}-profile"
    check_out_folder(check_args(args).out, args.force, "profile folder", is_profile_folder)  # before any long work
    apply_threads(args.threads)
    from ertacache.models.loading import load_bundle
    from ertacache.video import example_output
    from ertacache.profile.build import build_profile, read_prompts_file
    from ertacache.profile.schedule import mask_summary
    from ertacache.sampling.settings import SampleSettings

    from ertacache.models.recipes import load_recipe

    prompts = read_prompts_file(args.prompts) if args.prompts else None
    recipe = load_recipe(args.model)
    images = read_images(recipe, args.image, required=False)  # an I2V model without --image: sample photographs
    # flags the model cannot take (--frames for an image model, a guidance scale for a guidance-free one)
    # are refused here, before the model loads
    settings = SampleSettings.from_recipe(
        recipe, height=args.height, width=args.width, frames=args.frames, steps=args.steps, shift=args.shift,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, guidance_scale_2=args.guidance_scale_2,
    )
    with loading_model(args.model, args.model_path):
        bundle = load_bundle(args.model, args.model_path, pick_device(args.device), args.dtype)
    speedup = args.speedup if args.lam is not None or args.speedup is not None else recipe.defaults.speedup
    config = calibration_config(args, args.lam, speedup, args.batch_size or recipe.defaults.calibration_batch_size,
                                recipe.defaults.predictor_curvature)
    prompts = prompts or list(recipe.calibration_prompts)
    print(f"calibrating {bundle.model_id} ({bundle.fingerprint}) on {len(prompts)} prompts, "
          f"{settings.steps} steps, {settings.size}, {config.loop} loop, "
          f"{config.predictor.kind} predictor (order {config.predictor.order})")
    profile = build_profile(bundle, config, settings, prompts, seed=args.seed, progress=not args.quiet, images=images)
    out = profile.save(args.out, force=args.force)
    print(f"mask   {mask_summary(profile.mask)}")
    print(f"full steps {profile.full_steps}/{profile.steps} (T/N_full = {profile.speedup_steps:.2f}), "
          f"lambda {profile.lam:.5g}, calibration {profile.calibration['wall_s']:.1f} s "
          f"({profile.predictor['uncached_passes']:g} uncached passes of model calls)")
    print(f"profile written to {out}")
    model = f"--model {args.model}" + (f" --model-path {args.model_path}" if args.model_path else "")
    print(f"next: ertacache-generate {model} --profile {out} --prompt \"...\" --out {example_output(bundle.family.is_video)}\n"
          f"      ertacache-export {model} --profile {out} --engines engines/{args.model}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
