"""Flags shared by the CLIs (named as in TensorRT's diffusion demo) and error reporting.

Nothing heavy is imported here: every CLI builds its parser and parses its arguments (and
answers --help and --version) before torch, diffusers or ONNX Runtime load, which takes
seconds. Heavy imports live inside each CLI's ``_main`` after ``parse_args``.

One flag name per concept across the CLIs:

    --engines DIR   an export folder (ertacache-export writes it; run, verify, build, triton read it);
                    ertacache-export also accepts its old spelling --out
    --profile DIR   a profile folder given to a command (ertacache-profile writes it with --out)
    --out PATH      what this command writes (a profile folder, a video, plots)
    --threads N     CPU threads of this process (PyTorch, Inductor's code, ONNX Runtime; 0 = auto)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ertacache import __version__
from ertacache.errors import ErtaCacheError, UserError
from ertacache.models.recipes import DEFAULT_MODEL, available_models

#: the runtime's backends and the export targets, as in ertacache.engines.base.BACKENDS and
#: ertacache.export.config.TARGETS (tests/cli checks they agree); spelled here so --help needs no torch
BACKEND_NAMES = ("onnxruntime", "tensorrt", "aoti", "torch")
EXPORT_TARGETS = ("onnx", "aoti", "tensorrt")
DEFAULT_EXPORT_TARGETS = ("onnx", "aoti")

#: --threads default, 0 = auto: PyTorch's pool (eager ops, and Inductor's code in torch.compile and
#: AOTInductor) gets 1 thread, ONNX Runtime all cores. Measured with tools/bench_threads.py on the
#: project's 2-core machines (docs/engines.md, "Threads"): with 2 threads PyTorch's OpenMP steps ran
#: 5-10x slower (up to 69x for the cached step) whenever another process held a core, because its
#: workers wait for each other at every op, while ONNX Runtime's (non-spinning) threads gained 1.2-1.7x.
DEFAULT_THREADS = 0
TORCH_AUTO_THREADS = 1


def new_parser(prog: str, description: str, threads: bool = True, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every console script has: --version and (by default) --threads."""
    p = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (ertacache)")
    if threads:
        add_threads_arg(p)
    return p


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"give 0 (auto) or more threads, got {value}")
    return value


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, default=DEFAULT_THREADS, metavar="N",
                        help="CPU threads of PyTorch (eager and Inductor's compiled code) and ONNX Runtime "
                             f"(default 0: auto, {TORCH_AUTO_THREADS} for PyTorch, all cores for ONNX Runtime; more "
                             "PyTorch threads than free cores make each step many times slower on a busy "
                             "machine, see docs/engines.md)")


def apply_threads(threads: int) -> None:
    """Set this process's PyTorch threads: the pool eager ops, torch.compile and AOTInductor code use.

    ONNX Runtime's threads are per session: pass ``threads`` (0 = all cores) as ``intra_op_threads``.
    """
    import torch

    torch.set_num_threads(threads or TORCH_AUTO_THREADS)


def add_engines_arg(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    parser.add_argument("--engines", required=required, metavar="DIR",
                        help=help or "export folder (written by ertacache-export --engines)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model id, one of {available_models()} (default: {DEFAULT_MODEL}, the embedded testbed)")
    parser.add_argument("--model-path", default=None,
                        help="local diffusers-format folder of the model (default: the package or the hub cache)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="transformer precision (default: the recipe's)")


#: the product's calibration defaults (docs/results.md has the ablation behind them); spelled here, not
#: imported, so that --help answers without loading torch
DEFAULT_LOOP = "closed"
DEFAULT_PREDICTOR = "taylor"
DEFAULT_PREDICTOR_ORDER = 2
DEFAULT_PHI_RULE = "auto"


def add_calibration_args(parser: argparse.ArgumentParser, ablations: bool = True) -> None:
    """How a profile is fitted: loop, predictor, and (``ablations``) the switches of each component."""
    parser.add_argument("--loop", choices=["closed", "open"], default=None,
                        help="closed: schedule from errors along the cached trajectory; open: from the uncached "
                             f"one (one pass cheaper) (default: {DEFAULT_LOOP})")
    parser.add_argument("--predictor", choices=["reuse", "taylor", "adaptive", "fitted"], default=None,
                        help="how a cached step predicts the block residual: reuse = the paper's (last residual); "
                             "taylor = Lagrange extrapolation of the last K = order + 1 full residuals; adaptive = per step the "
                             "order <= --predictor-order whose extrapolation erred least in calibration; fitted = "
                             f"ridge least squares shrunk toward taylor (default: {DEFAULT_PREDICTOR})")
    parser.add_argument("--predictor-order", type=int, default=None,
                        help=f"order of taylor, highest order of adaptive, prior of fitted, 0-3 (default: {DEFAULT_PREDICTOR_ORDER})")
    parser.add_argument("--predictor-curvature", type=float, default=None,
                        help="scale on the extrapolation's terms of order >= 2, 0-1: 1 = the exact polynomial through "
                             "the last K full residuals, 0 = the line through the newest two; docs/predictor.md "
                             "(default: the model recipe's, 0.5 for wan2.1 and wan2.1-tiny, else 1)")
    if not ablations:
        return
    parser.add_argument("--predictor-ridge", type=float, default=0.1, help="fitted: shrinkage toward taylor")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="leading steps that always compute (default: 1; before K full steps a cached step "
                             "predicts from the residuals there are, a lower order)")
    parser.add_argument("--phi-rule", choices=["auto", "paper", "lsq"], default=DEFAULT_PHI_RULE,
                        help="step scale phi: the paper's ratio, or the least-squares scale of the update; auto = "
                             "paper with --predictor reuse (the paper's method), lsq otherwise")
    parser.add_argument("--schedule-weight", choices=["auto", "none", "dt", "dt-late"], default="auto",
                        help="what the mask rule compares with lambda: each step's calibration error as it is "
                             "(none, the paper's), times the step's length over the mean (dt), or times it only where "
                             "it is above the mean (dt-late: the long late steps weigh more); auto = none with "
                             "--predictor reuse (the paper's method), dt-late otherwise; docs/predictor.md (default: auto)")
    parser.add_argument("--no-time-adjust", action="store_true", help="ablation: keep the nominal sigma table")
    parser.add_argument("--no-rectify", action="store_true", help="ablation: no velocity correction")


def calibration_config(args, lam: float | None, speedup: float | None, batch_size: int, curvature: float = 1.0):
    """The :class:`~ertacache.profile.config.CalibrationConfig` of ``add_calibration_args``' flags
    (``curvature``: the recipe's default for ``--predictor-curvature``)."""
    from ertacache.profile.config import CalibrationConfig
    from ertacache.profile.predictor import PredictorConfig

    kind = args.predictor or DEFAULT_PREDICTOR
    order = DEFAULT_PREDICTOR_ORDER if args.predictor_order is None else args.predictor_order
    curvature = curvature if args.predictor_curvature is None else args.predictor_curvature
    predictor = PredictorConfig(kind=kind, order=0 if kind == "reuse" else order,
                                ridge=getattr(args, "predictor_ridge", 0.1), curvature=curvature)
    return CalibrationConfig(
        lam=lam, speedup=None if lam is not None else speedup, loop=args.loop or DEFAULT_LOOP,
        warmup_steps=getattr(args, "warmup_steps", None), predictor=predictor,
        phi_rule=getattr(args, "phi_rule", DEFAULT_PHI_RULE), time_adjust=not getattr(args, "no_time_adjust", False),
        rectify=not getattr(args, "no_rectify", False), batch_size=batch_size,
        schedule_weight=getattr(args, "schedule_weight", "auto"),
    )


def check_calibration_flags_against(args, profile, where: str) -> None:
    """Refuse calibration flags given with a finished profile when they ask for something else.

    The profile's predictor, order and loop were fixed when it was fitted (its weights and schedule
    belong to them); a flag that differs would be silently ignored otherwise.
    """
    from ertacache.errors import UserError

    pred = profile.predictor
    asked = [("--predictor", args.predictor, pred.get("kind")),
             ("--predictor-order", args.predictor_order, pred.get("order")),
             # a profile without the key predates the flag: its weights are the exact polynomial
             ("--predictor-curvature", args.predictor_curvature,
              pred.get("curvature", 1.0) if pred.get("order", 0) >= 2 else None),
             ("--loop", args.loop, profile.config.get("loop"))]
    for flag, value, have in asked:
        if value is not None and have is not None and value != have:
            raise UserError(f"{flag} {value} differs from {where}, which was fitted with {flag} {have}; drop the "
                            f"flag to use the profile as it is, or re-profile with {flag} {value}")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default: recipe)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default: recipe)")
    parser.add_argument("--frames", type=int, default=None, help="number of video frames, video models only (default: recipe)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale; <= 1 disables CFG")
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="CFG scale of a two-expert model's low-noise expert (Wan2.2 A14B; default: recipe)")
    parser.add_argument("--shift", type=float, default=None, help="flow-matching sigma shift (default: recipe)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: recipe)")


def add_image_arg(parser: argparse.ArgumentParser, calibration: bool = False) -> None:
    """``--image FILE``: the conditioning image of an image-to-video model (its first frame)."""
    if calibration:
        parser.add_argument("--image", action="append", default=None, metavar="FILE",
                            help="image-to-video models: a conditioning image, repeatable, cycled over the "
                                 "calibration prompts (default: crops of scikit-learn's sample photographs)")
    else:
        parser.add_argument("--image", default=None, metavar="FILE",
                            help="image-to-video models: the conditioning image (the video's first frame)")


def read_images(recipe, paths, required: bool):
    """The ``--image`` files as (H, W, 3) uint8 arrays (None when none were given), checked against the model
    before it loads: refused for a text-only model, demanded by an image-to-video one where ``required``."""
    from ertacache.errors import UserError
    from ertacache.models.family import family_named
    from ertacache.models.images import load_image

    paths = [paths] if isinstance(paths, str) else list(paths or [])
    takes = family_named(recipe.family).takes_images
    if paths and not takes:
        raise UserError(f"{recipe.model} is not image-conditioned: it takes no --image; drop the flag")
    if required and takes and not paths:
        raise UserError(f"{recipe.model} is image-to-video: give the conditioning image with --image FILE "
                        "(the video's first frame)")
    return [load_image(p) for p in paths] or None


def pick_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; user errors print one clear line and exit 2 instead of a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ErtaCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
