"""Flags shared by the CLIs (named as in TensorRT's diffusion demo) and error reporting."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from ertacache.errors import ErtaCacheError, UserError
from ertacache.models.recipes import DEFAULT_MODEL, available_models


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model id, one of {available_models()} (default: {DEFAULT_MODEL}, the embedded testbed)")
    parser.add_argument("--model-path", default=None,
                        help="local diffusers-format folder of the model (default: the package or the hub cache)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="transformer precision (default: the recipe's)")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default: recipe)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default: recipe)")
    parser.add_argument("--frames", type=int, default=None, help="number of video frames (default: recipe)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale; <= 1 disables CFG")
    parser.add_argument("--shift", type=float, default=None, help="flow-matching sigma shift (default: recipe)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (default: recipe)")


def pick_device(name: str | None) -> torch.device:
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
