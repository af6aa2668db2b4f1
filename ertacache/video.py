"""Write generated frames as GIF, MP4 or a PNG grid."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ertacache.errors import UserError, brief
from ertacache.io import atomic_write_bytes

VIDEO_SUFFIXES = (".gif", ".mp4", ".png")


def _upscale(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale of tiny testbed frames so a viewer shows pixels, not a blur."""
    f, h, w, _ = frames.shape
    k = max(1, min_side // max(1, min(h, w)))
    return frames.repeat(k, axis=1).repeat(k, axis=2)  # (F, H*k, W*k, 3)


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse an output name this install cannot write, before any sampling (a failure after would waste the run).

    MP4 goes through imageio's ffmpeg plugin (the imageio-ffmpeg dependency ships an ffmpeg binary).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"--out must end in one of {VIDEO_SUFFIXES}, got {brief(path.name, 60)}")
    if suffix == ".mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()
        except Exception as e:  # not installed, or a platform without a bundled ffmpeg binary and none on PATH
            raise UserError(f"cannot write {brief(path.name, 60)}: MP4 needs imageio and imageio-ffmpeg with an ffmpeg "
                            f"binary ({type(e).__name__}: {brief(str(e), 100)}); pip install imageio imageio-ffmpeg, "
                            "or write .gif") from None
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name ending in one of {VIDEO_SUFFIXES}")
    return path


def output_kind(frames: int) -> str:
    """What a decoded output of ``frames`` frames is called in messages: an image model decodes one frame."""
    return "image" if frames == 1 else "video"


def example_output(is_video: bool) -> str:
    """The output file name the CLIs' "next:" hints suggest: a GIF for a video model, a PNG for an image model."""
    return "video.gif" if is_video else "image.png"


def save_video(frames, path: str | os.PathLike, fps: int = 8, overwrite: bool = True) -> Path:
    """frames: (F, H, W, 3) uint8 for one video, or (B, F, H, W, 3) for a batch laid side by side.

    ``overwrite=False`` refuses an existing ``path`` (also one that appeared while sampling).
    """
    path = check_writable(path)
    suffix = path.suffix.lower()
    arr = np.asarray(frames)
    if arr.ndim == 5:  # (B, F, H, W, 3) -> (F, H, B*W, 3): the batch side by side
        arr = np.concatenate(list(arr), axis=2)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {arr.dtype} {arr.shape}")
    arr = _upscale(arr)
    buf = io.BytesIO()
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in arr]
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif suffix == ".png":
        Image.fromarray(np.concatenate(list(arr), axis=1)).save(buf, format="PNG")  # frames left to right
    else:
        try:
            import imageio.v3 as iio

            buf.write(iio.imwrite("<bytes>", arr, extension=".mp4", fps=fps))
        except Exception as e:  # imageio without an ffmpeg plugin
            raise UserError(f"writing MP4 failed in imageio's ffmpeg plugin ({type(e).__name__}: {e}); write .gif "
                            "instead, or check the install: pip install imageio imageio-ffmpeg") from None
    atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)
    return path
