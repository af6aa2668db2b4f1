"""ertacache-export: calibrate (or load a profile), bake it into static graphs, validate, write one folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ertacache.cli.common import (
    DEFAULT_EXPORT_TARGETS, EXPORT_TARGETS, add_calibration_args, add_model_args, add_shape_args, apply_threads,
    calibration_config, check_calibration_flags_against, new_parser, pick_device, run_cli,
)
from ertacache.cli.validate import check_args, check_out_folder, loading_model
from ertacache.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="ertacache-export",
        description="Bake an ERTACache profile into static full-step / cached-step graphs (ONNX, AOTInductor), "
                    "validate them against eager PyTorch and write one self-describing folder.",
    )
    add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--profile", default=None, help="profile folder from ertacache-profile (else: calibrate now)")
    source.add_argument("--speedup", type=float, default=None,
                        help="calibrate for this T / N_full (default: the recipe's, 2.0)")
    source.add_argument("--lambda", dest="lam", type=float, default=None, help="calibrate with this threshold")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: recipe or the profile's)")
    add_shape_args(p)
    p.add_argument("--batch-size", type=int, default=1, help="videos per request; the graphs are static in it")
    p.add_argument("--targets", default=",".join(DEFAULT_EXPORT_TARGETS),
                   help=f"comma-separated subset of {list(EXPORT_TARGETS)} (tensorrt needs TensorRT and a GPU here; "
                        "else build engines on the target with ertacache-build)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: recipe's set)")
    add_calibration_args(p, ablations=False)
    p.add_argument("--no-decode-graph", action="store_true", help="skip the vae_decode graph")
    p.add_argument("--no-trt-op-check", action="store_true",
                   help="accept ONNX ops TensorRT's parser does not support (ONNX Runtime only)")
    p.add_argument("--timing-repeats", type=int, default=5, help="timed runs per step graph for c (0: skip)")
    p.add_argument("--engines", "--out", dest="engines", metavar="DIR", default=None,
                   help="export folder to write (default: engines/<model>); the other commands take it as "
                        "--engines (--out is the old spelling, still accepted)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no calibration progress bars")
    return p


def _check_profile_flags(args, profile) -> None:
    from ertacache.models.family import check_guidance, guidance_branches
    from ertacache.models.recipes import load_recipe
    from ertacache.sampling.settings import check_frames_flag

    check_frames_flag(load_recipe(args.model), args.frames)  # an image model takes no --frames
    for flag, value, have in (("--steps", args.steps, profile.steps), ("--height", args.height, profile.height),
                              ("--width", args.width, profile.width), ("--frames", args.frames, profile.frames),
                              ("--shift", args.shift, profile.shift)):
        if value is not None and value != have:
            raise UserError(f"{flag} {value} differs from the profile {args.profile} ({flag} {have}); drop the flag, "
                            "or make a profile for the new setting (ertacache-profile, or drop --profile here)")
    check_calibration_flags_against(args, profile, f"the profile {args.profile}")
    if profile.model != args.model:
        raise UserError(f"the profile {args.profile} was made for --model {profile.model}, not {args.model}; pass "
                        f"--model {profile.model} or drop --profile to calibrate {args.model} now")
    if args.guidance_scale is not None:
        check_guidance(profile.guidance, args.guidance_scale, args.model)  # e.g. a scale for guidance-free schnell
    if args.guidance_scale is not None and guidance_branches(profile.guidance, args.guidance_scale) != profile.n_branches:
        raise UserError(f"--guidance-scale {args.guidance_scale} turns CFG {'on' if args.guidance_scale > 1 else 'off'}"
                        f" but the profile was calibrated with it {'on' if profile.n_branches == 2 else 'off'}")


def _calibration_settings(args, recipe):
    """The settings to calibrate with; refuses flags the model cannot take, before it loads."""
    from ertacache.sampling.settings import SampleSettings

    return SampleSettings.from_recipe(
        recipe, height=args.height, width=args.width, frames=args.frames, steps=args.steps, shift=args.shift,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
    )


def _calibrate(args, bundle, settings):
    from ertacache.profile.build import build_profile, read_prompts_file

    recipe = bundle.recipe
    config = calibration_config(args, args.lam, args.speedup or recipe.defaults.speedup,
                                recipe.defaults.calibration_batch_size, recipe.defaults.predictor_curvature)
    prompts = read_prompts_file(args.prompts) if args.prompts else list(recipe.calibration_prompts)
    print(f"[calibrate] {bundle.model_id} on {len(prompts)} prompts, {settings.steps} steps, "
          f"{settings.size}, {config.loop} loop")
    profile = build_profile(bundle, config, settings, prompts, progress=not args.quiet)
    return profile, settings.negative_prompt


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_summary(report) -> None:
    from ertacache.profile.schedule import mask_summary

    m = report.manifest
    prof = m["profile"]
    print(f"\nexport folder {report.out}")
    for rel, size in sorted(report.files.items()):
        print(f"  {rel:40s} {_size(size):>10s}")
    print(f"schedule  {mask_summary(prof['mask'])}  ({prof['full_steps']}/{prof['steps']} full steps)")
    slots = [i["name"] for i in m["graphs"]["cached_step"]["inputs"] if i["name"].startswith("residual")]
    print(f"predictor {prof.get('predictor', {}).get('kind', 'reuse')} over the last {prof.get('history', 1)} "
          f"full-step residual(s), cached_step slots {', '.join(slots)}")
    experts = prof.get("experts")
    if experts:  # a two-expert model: which pair runs which steps, with which CFG scale
        ends = [*experts["starts"][1:], prof["steps"]]
        pairs = [("full_step, cached_step" if e == 0 else f"full_step_{e + 1}, cached_step_{e + 1}")
                 + f": steps {s}..{end - 1}, CFG {g:g}"
                 for e, (s, end, g) in enumerate(zip(experts["starts"], ends, experts["guidance_scales"]))]
        print(f"experts   {'; '.join(pairs)} (switch at boundary_ratio {experts['boundary_ratio']:g})")
    if report.validation:
        print(f"validation (final latents vs eager, {m['dtype']}, whole schedule):")
        print(f"  {'target':8s} {'rel L2':>10s} {'max |diff|':>11s} {'decode':>7s}")
        for target, row in report.validation.items():
            dec = row.get("decode_max_abs_uint8", "-")
            print(f"  {target:8s} {row['rel_l2']:10.3e} {row['max_abs']:11.3e} {dec!s:>7s}")
    for backend, t in report.timing.items():
        if isinstance(t, dict):
            print(f"  {backend:12s} full {t['full_s'] * 1e3:8.2f} ms  cached {t['cached_s'] * 1e3:8.2f} ms  "
                  f"c = {t['c']:.3f}  bound T/(N_full + N_cached*c) = {t['speedup_bound']:.2f}x")
    print(f"digest    {report.digest}  (pin it: --expect-digest on ertacache-run / -verify / -build / -triton)")


def _main(argv: list[str] | None) -> int:
    args = check_args(parser().parse_args(argv))
    apply_threads(args.threads)
    from ertacache.export.config import ExportConfig
    from ertacache.export.package import ExportPackage, ModelIdentity, is_export_folder
    from ertacache.models.loading import load_bundle
    from ertacache.video import example_output
    from ertacache.models.recipes import load_recipe
    from ertacache.profile.artifact import load_profile
    from ertacache.profile.schedule import mask_summary

    recipe = load_recipe(args.model)
    config = ExportConfig(
        out=Path(args.engines or Path("engines") / args.model), targets=args.targets,
        dtype=args.dtype or recipe.defaults.dtype, batch_size=args.batch_size, force=args.force, opset=args.opset,
        check_tensorrt_ops=not args.no_trt_op_check, decode_graph=not args.no_decode_graph,
        timing_repeats=args.timing_repeats,
    )
    profile = load_profile(args.profile) if args.profile else None
    if profile is not None:  # a profile of another model is named as such, before any dtype/machine check
        _check_profile_flags(args, profile)
    settings = _calibration_settings(args, recipe) if profile is None else None
    config.check_machine()
    check_out_folder(config.out, config.force, "export folder", is_export_folder)  # before minutes of calibration
    print(f"[load] {args.model} ({config.dtype})")
    with loading_model(args.model, args.model_path):
        bundle = load_bundle(args.model, args.model_path, pick_device(args.device), config.dtype)
    if profile is None:
        profile, negative = _calibrate(args, bundle, settings)
        profile_dir = None
    else:
        profile.check_matches(model=bundle.model_id, fingerprint=bundle.fingerprint, where=f"profile {args.profile}")
        negative = args.negative_prompt if args.negative_prompt is not None else \
            profile.calibration.get("negative_prompt", "")
        profile_dir = Path(args.profile)
    print(f"[profile] {mask_summary(profile.mask)}  lambda {profile.lam:.4g}")
    probe = (profile.calibration.get("prompts") or list(bundle.recipe.calibration_prompts))[:1]
    from ertacache.models.images import images_for

    size = (profile.frames, profile.height, profile.width)
    encoded = bundle.encode(probe, negative, profile.n_branches, images_for(bundle.family, 1, size=size),
                            size)  # an I2V model: a sample image (only the shapes are kept)
    # one prompt's shape without the row axis: (L, D_text), or per input for a family with several (FLUX)
    text_shape = ({name: tuple(t.shape[1:]) for name, t in encoded.items()} if isinstance(encoded, dict)
                  else tuple(encoded.shape[1:]))
    identity = ModelIdentity.from_bundle(bundle, text_shape, negative)
    report = ExportPackage(config)(bundle.adapters, profile, identity, text_shape, bundle.decoder, profile_dir)
    print_summary(report)
    backend = "onnxruntime" if "onnx" in config.targets else config.targets[0]
    print(f"next: ertacache-run --engines {config.out} --backend {backend} --prompt \"...\" --out {example_output(bundle.family.is_video)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
