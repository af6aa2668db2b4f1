"""Early checks of CLI arguments: everything a run can refuse before it loads a model or samples a step.

Each console script calls :func:`check_args` right after parsing (and the output checks for its
``--out``), so a bad value costs milliseconds, not a calibration: numbers are finite and in
range, seeds fit int64, prompts are bounded, ``--device`` names a device this machine has,
``--out`` can be written (and is not silently replaced), a video suffix has a writer.

Every refusal is a :class:`~ertacache.errors.UserError` naming the flag, the value (capped) and
the fix; the CLIs' ``run_cli`` prints it as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable

from ertacache.errors import UserError, brief
from ertacache.limits import MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, check_prompt

#: the largest pixel size of one side, frame count and batch
MAX_SIDE, MAX_FRAMES, MAX_BATCH = 16_384, 4_096, 1_024

# flag -> (attribute, kind, lower bound, upper bound, lower bound inclusive); checked when present and not None
_BOUNDS: list[tuple[str, str, str, float | None, float | None, bool]] = [
    ("--steps", "steps", "int", 1, MAX_STEPS, True),
    ("--seed", "seed", "int", 0, MAX_SEED, True),
    ("--height", "height", "int", 1, MAX_SIDE, True),
    ("--width", "width", "int", 1, MAX_SIDE, True),
    ("--frames", "frames", "int", 1, MAX_FRAMES, True),
    ("--batch-size", "batch_size", "int", 1, MAX_BATCH, True),
    ("--warmup-steps", "warmup_steps", "int", 1, MAX_STEPS, True),
    ("--predictor-order", "predictor_order", "int", 0, 3, True),
    ("--predictor-curvature", "predictor_curvature", "float", 0.0, 1.0, True),
    ("--predictor-ridge", "predictor_ridge", "float", 0.0, 1e9, True),
    ("--timing-repeats", "timing_repeats", "int", 0, 10_000, True),
    ("--opset", "opset", "int", 18, 100, True),
    ("--instances", "instances", "int", 1, 1_024, True),
    ("--max-batch-size", "max_batch_size", "int", 0, MAX_BATCH, True),
    ("--intra-op-threads", "intra_op_threads", "int", 0, 4_096, True),
    ("--guidance-scale", "guidance_scale", "float", 0.0, 1e4, True),
    ("--guidance-scale-2", "guidance_scale_2", "float", 0.0, 1e4, True),
    ("--shift", "shift", "float", 0.0, 1e4, False),
    ("--speedup", "speedup", "float", 1.0, 1e4, True),
    ("--lambda", "lam", "float", 0.0, 1e6, True),
    ("--tolerance", "tolerance", "float", 0.0, 1e6, False),
    ("--workspace-gib", "workspace_gib", "float", 0.0, 1e6, False),
    ("--calibration-seed", "calibration_seed", "int", 0, MAX_SEED, True),
    ("--study-speedup", "study_speedup", "float", 1.0, 1e4, True),
    ("--repeats", "repeats", "int", 0, 10_000, True),
    ("--http-port", "http_port", "int", 0, 65_535, True),
    ("--grpc-port", "grpc_port", "int", 0, 65_535, True),
    ("--metrics-port", "metrics_port", "int", 0, 65_535, True),
]


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Bounds of every numeric flag the namespace has, the prompt, and --device; returns ``args``."""
    for flag, attr, kind, lo, hi, lo_inclusive in _BOUNDS:
        value = getattr(args, attr, None)
        if value is None:
            continue
        if kind == "float" and not math.isfinite(value):
            raise UserError(f"{flag} {value} is not a finite number; give a value in {_range(lo, hi, lo_inclusive)}")
        low_ok = lo is None or (value >= lo if lo_inclusive else value > lo)
        if not low_ok or (hi is not None and value > hi):
            raise UserError(f"{flag} {brief(value, 40)} is out of range; give a value in "
                            f"{_range(lo, hi, lo_inclusive)}")
    prompt = getattr(args, "prompt", None)
    if prompt is not None:
        check_prompt(prompt)
    negative = getattr(args, "negative_prompt", None)
    if negative is not None and len(negative) > MAX_PROMPT_CHARS:
        raise UserError(f"--negative-prompt is {len(negative)} characters long; give at most {MAX_PROMPT_CHARS}")
    device = getattr(args, "device", None)
    if device is not None:
        check_device(device, getattr(args, "backend", None), getattr(args, "providers", None))
    return args


def _range(lo, hi, lo_inclusive: bool) -> str:
    def fmt(x):
        return str(x) if isinstance(x, int) else f"{x:g}"
    return f"{'[' if lo_inclusive else '('}{fmt(lo)}, {fmt(hi)}]"


def check_device(name: str, backend: str | None = None, providers: str | None = None) -> None:
    """A torch device string this machine has; with ONNX Runtime, the device follows --providers."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {brief(name, 40)} is not a device; give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {brief(name, 40)}: this tool runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: torch sees no CUDA GPU here (CPU build of torch, or no driver); use "
                            "--device cpu or run on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if backend == "onnxruntime":
        cuda_providers = any(p in (providers or "") for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        if device.type == "cuda" and not cuda_providers:
            raise UserError(f"--device {name} with --backend onnxruntime: ONNX Runtime places its buffers by "
                            "--providers; pass --providers CUDAExecutionProvider (onnxruntime-gpu) instead of "
                            "--device, or drop --device")
        if device.type == "cpu" and cuda_providers:
            raise UserError(f"--device cpu contradicts --providers {brief(providers, 60)}; drop --device")


def _writable_parent(path: Path, flag: str) -> None:
    parent = path.absolute().parent
    probe = parent
    while not probe.exists():  # the folder will be created: its first existing ancestor must be writable
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable; choose another {flag}")


def check_out_folder(path: str | os.PathLike, force: bool, what: str, recognise: Callable[[Path], bool],
                     flag: str = "--out") -> Path:
    """--out names a folder this tool writes: not an existing file, existing only with --force and recognised."""
    from ertacache.io import check_replaceable

    path = Path(path)
    check_replaceable(path.absolute(), force, what, recognise)
    _writable_parent(path, flag)
    return path


def check_out_video(path: str | os.PathLike, force: bool, flag: str = "--out") -> Path:
    """--out names a video file: a known suffix with a writer here, not a folder, existing only with --force."""
    from ertacache.io import check_replaceable
    from ertacache.video import VIDEO_SUFFIXES, check_writable

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a video file name ending in one of {VIDEO_SUFFIXES}")
    check_writable(path)  # suffix, and for .mp4 an FFmpeg writer: found out now, not after sampling
    check_replaceable(path.absolute(), force, "output file", kind="file")
    _writable_parent(path, flag)
    return path


def check_out_json(path: str | os.PathLike | None, flag: str = "--json") -> None:
    """A report file: not a folder, its folder exists or can be made."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    _writable_parent(path, flag)


def add_digest_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expect-digest", default=None, metavar="SHA256",
                        help="refuse the export folder unless its digest (printed by ertacache-export / -build, the "
                             "sha256 of its manifest.json, which lists every file's sha256) is this one")


def check_digest_arg(value: str | None) -> None:
    from ertacache.contract import normalise_digest

    if value is None:
        return
    try:
        normalise_digest(value)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_folder_arg(path: Any, flag: str, create_with: str) -> Path:
    """An input folder: exists and is a folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; create it with {create_with}")
    if not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give the folder {create_with} wrote")
    return path


def _model_source(model: str) -> str:
    """Where a model id loads from without --model-path: the folder inside the package, or the hub cache."""
    from ertacache.models.recipes import load_recipe

    try:
        recipe = load_recipe(model)
    except UserError:
        return "the hub cache"
    return f"the package's {recipe.package_path} folder" if recipe.package_path else "the hub cache"


@contextlib.contextmanager
def loading_model(model: str, model_path: str | None):
    """Around a model load: a folder diffusers/transformers cannot read becomes one error line, not a traceback.

    Only errors of reading files (OSError, ValueError incl. JSON, safetensors and config errors) are
    converted; they name the folder and the fix. ``UserError`` passes through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = f"--model-path {model_path}" if model_path else f"--model {model} (from {_model_source(model)})"
        raise UserError(f"{where} cannot be loaded ({type(e).__name__}: {brief(str(e), 200)}); check that the folder "
                        "is a complete diffusers-format download (re-download it), or pass another --model-path") \
            from None
