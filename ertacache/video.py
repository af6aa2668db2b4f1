"""Write generated frames as GIF, MP4 or a PNG grid."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ertacache.errors import UserError
from ertacache.io import atomic_write_bytes

VIDEO_SUFFIXES = (".gif", ".mp4", ".png")


def _upscale(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale of tiny testbed frames so a viewer shows pixels, not a blur."""
    f, h, w, _ = frames.shape
    k = max(1, min_side // max(1, min(h, w)))
    return frames.repeat(k, axis=1).repeat(k, axis=2)  # (F, H*k, W*k, 3)


def save_video(frames, path: str | os.PathLike, fps: int = 8, overwrite: bool = True) -> Path:
    """frames: (F, H, W, 3) uint8 for one video, or (B, F, H, W, 3) for a batch laid side by side.

    ``overwrite=False`` refuses an existing ``path`` (also one that appeared while sampling).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"--out must end in one of {VIDEO_SUFFIXES}, got {path.name!r}")
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
            raise UserError(f"writing MP4 needs imageio with ffmpeg (pip install imageio-ffmpeg): {e}") from None
    atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)
    return path
