"""Fidelity of a cached sample against the uncached one with the same seed (kept libraries)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _as_float_frames(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {arr.dtype}")
    return arr.astype(np.float64) / 255.0


def psnr(reference, test) -> float:
    """PSNR in dB of uint8 videos (..., H, W, 3); inf when identical."""
    ref, tst = _as_float_frames(reference), _as_float_frames(test)
    if np.array_equal(ref, tst):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, tst, data_range=1.0))


def ssim(reference, test) -> float:
    """Mean SSIM over frames of uint8 videos (F, H, W, 3) or one frame (H, W, 3)."""
    ref, tst = _as_float_frames(reference), _as_float_frames(test)
    ref = ref.reshape(-1, *ref.shape[-3:])  # (frames, H, W, 3)
    tst = tst.reshape(-1, *tst.shape[-3:])
    side = min(ref.shape[1:3])
    win = 7 if side >= 7 else max(3, side - (1 - side % 2))  # odd window no larger than the frame
    return float(np.mean([structural_similarity(r, t, channel_axis=-1, data_range=1.0, win_size=win)
                          for r, t in zip(ref, tst)]))
