"""ertacache-run: sample a video from an export folder with one backend (the alternating runtime)."""

from __future__ import annotations

import argparse
import time

from ertacache.cli.common import BACKEND_NAMES, add_engines_arg, apply_threads, new_parser, run_cli
from ertacache.cli.validate import add_digest_arg, check_args, check_digest_arg, check_folder_arg, check_out_video


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_engines_arg(p)
    p.add_argument("--backend", default="onnxruntime", help=f"one of {list(BACKEND_NAMES)} (default: onnxruntime)")
    p.add_argument("--providers", default=None,
                   help="ONNX Runtime providers in order, comma-separated (default: CPUExecutionProvider)")
    p.add_argument("--device", default=None, help="torch device of the buffers (default: the backend's)")
    p.add_argument("--model-path", default=None, help="model folder for --prompt and the torch backend "
                                                     "(default: the manifest's)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", default=None, help="text prompt (encoded with the folder's text encoder)")
    text.add_argument("--text-embeds", default=None,
                      help=".npy of shape (nb*B, L, D_text): cond rows, then (CFG) uncond rows; for a folder "
                           "with several conditioning inputs (FLUX) an .npz with one array per input name")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="image-to-video folders, with --prompt: the conditioning image (the first frame), encoded "
                        "with the model's image encoder")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample k of a batch uses seed + k)")
    add_digest_arg(p)


def check_image_args(args) -> None:
    """``--image`` against ``--prompt`` and the folder's model, before any engine loads: it goes with a prompt, an
    image-to-video folder's prompt needs it, and the file must be an image we can read."""
    from ertacache.errors import UserError

    if args.image is None:
        if args.prompt is not None and _folder_takes_images(args.engines):
            raise UserError("this export folder's model is image-to-video: give the conditioning image with "
                            "--image FILE")
        return
    if args.prompt is None:
        raise UserError("--image goes with --prompt; with --text-embeds the .npz already holds the image inputs")
    from ertacache.models.images import load_image

    load_image(args.image)  # a missing or unreadable file is named now, not after the engines load


def _folder_takes_images(engines) -> bool:
    """Whether the folder's model (by its recipe) is image-conditioned; False when that cannot be told yet (the
    full manifest check that follows names a broken folder)."""
    from ertacache.contract import load_manifest
    from ertacache.errors import UserError
    from ertacache.models.recipes import takes_images

    try:
        return takes_images(load_manifest(engines, verify_files=False).model.id)
    except UserError:  # an unreadable manifest: Runtime's full check names it
        return False


def open_runtime(args):
    """The folder's Runtime, its arguments checked first, with --threads applied (torch's pool for aoti/torch,
    ONNX Runtime's intra-op threads) and the folder pinned to --expect-digest when given."""
    from ertacache.runtime import Runtime

    check_args(args)
    check_digest_arg(args.expect_digest)
    check_folder_arg(args.engines, "--engines", "ertacache-export --engines")
    check_image_args(args)
    apply_threads(args.threads)
    providers = args.providers.split(",") if args.providers else None
    return Runtime(args.engines, args.backend, device=args.device, providers=providers, model_path=args.model_path,
                   intra_op_threads=args.threads, expect_digest=args.expect_digest)


def request(args, manifest):
    from ertacache.runtime.inputs import noise_for, text_embeds_from_npy, text_embeds_from_prompt

    if args.prompt is not None:
        text = text_embeds_from_prompt(args.prompt, manifest, args.model_path, image=args.image)
    else:
        text = text_embeds_from_npy(args.text_embeds, manifest)
    return noise_for(manifest, args.seed), text


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-run", description="Run an export folder's step graphs with one backend "
                                "(full if mask[i] else cached) and write the video.")
    add_runtime_args(p)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale of this run (default: the profile's; folders exported with CFG only)")
    p.add_argument("--guidance-scale-2", type=float, default=None,
                   help="a two-expert folder's (Wan2.2 A14B) low-noise expert's CFG scale (default: the profile's, "
                        "or --guidance-scale when only that is given, as in WanPipeline)")
    p.add_argument("--out", required=True, help="output video: .gif, .mp4 or .png")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    check_out_video(args.out, args.force)  # before opening engines or sampling
    import torch

    from ertacache.runtime import StepTimes
    from ertacache.video import output_kind, save_video

    start = time.perf_counter()
    runtime = open_runtime(args)
    with runtime as rt:
        open_s = time.perf_counter() - start
        rt.request_guidance(args.guidance_scale, args.guidance_scale_2)  # refused before the prompt is encoded
        noise, text = request(args, rt.manifest)
        noise = noise.to(rt.device)  # the text (one tensor or one per input) is copied into the device buffers
        times = StepTimes()
        start = time.perf_counter()
        rt.sample(noise, text, args.guidance_scale, times=times, guidance_scale_2=args.guidance_scale_2)
        frames = rt.decode()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        total_s = time.perf_counter() - start
        out = save_video(frames[0].cpu().numpy() if frames.shape[0] == 1 else frames.cpu().numpy(), args.out,
                         overwrite=args.force)
    n_full, n_cached = len(times.full_s), len(times.cached_s)
    print(f"{args.backend}: {rt.steps} steps ({n_full} full, {n_cached} cached), predictor "
          f"{rt.manifest.schedule.predictor.get('kind', 'reuse')} (K = {rt.history}), open + bind {open_s:.2f} s")
    print(f"  full step   {times.full_median_s * 1e3:9.2f} ms (median of {n_full})")
    if n_cached:
        c = times.cached_median_s / times.full_median_s
        print(f"  cached step {times.cached_median_s * 1e3:9.2f} ms (median of {n_cached}), c = {c:.3f}")
    print(f"  sampling + decode {total_s:.3f} s")
    print(f"{output_kind(frames.shape[1])} written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
