"""A cheap, deterministic judge for testbed videos: which digit, which direction.

Caching changes samples a little; the question the judge answers is whether they
still show the prompted digit moving the prompted way. A logistic regression on 8x8
crops is enough for load_digits, trains in about a second at first use, and needs no
shipped artifact. It is trained on the *train* split of the digit images rendered
through the same crop path it later sees, and tested on the held-out split.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ertacache.testbed.data import (
    DIRECTIONS, DigitVideoSampler, VideoSpec, digit_images, render_videos, start_positions, upsample_digits,
)

INK_THRESHOLD = 0.15  # intensity in [0, 1] below which a pixel counts as background
MIN_SPEED = 0.5  # px/frame; a slower centre-of-mass track counts as "no motion"


def _gray01(frames_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (B, F, H, W, 3) or (B, F, H, W) -> float (B, F, H, W) in [0, 1]."""
    x = np.asarray(frames_uint8, dtype=np.float32) / 255.0
    if x.ndim == 5:
        x = x.mean(axis=-1)  # (B, F, H, W)
    if x.ndim != 4:
        raise ValueError(f"expected frames (B, F, H, W, 3), got shape {x.shape}")
    return x


def _ink(gray: np.ndarray) -> np.ndarray:
    """Intensity above the background threshold, same shape as ``gray``."""
    return np.clip(gray - INK_THRESHOLD, 0.0, None)


def centres_of_mass(gray: np.ndarray) -> np.ndarray:
    """(..., H, W) -> (..., 2) centre of mass (row, col) of the ink; canvas centre if empty."""
    h, w = gray.shape[-2:]
    ink = _ink(gray)
    mass = ink.sum(axis=(-2, -1))  # (...,)
    rows = (ink.sum(axis=-1) * np.arange(h)).sum(axis=-1)  # (...,)
    cols = (ink.sum(axis=-2) * np.arange(w)).sum(axis=-1)  # (...,)
    safe = np.where(mass > 1e-6, mass, 1.0)
    com = np.stack([rows / safe, cols / safe], axis=-1)  # (..., 2)
    com[mass <= 1e-6] = ((h - 1) / 2, (w - 1) / 2)
    return com


def crop_features(gray: np.ndarray, crop: int = 16) -> np.ndarray:
    """(N, H, W) frames -> (N, 64) features: crop x crop around the ink's centre, 2x2-pooled to 8x8."""
    n, h, w = gray.shape
    com = centres_of_mass(gray)  # (N, 2)
    feats = np.empty((n, 64), dtype=np.float32)
    pool = crop // 8
    for i in range(n):
        y0 = int(np.clip(round(com[i, 0] - (crop - 1) / 2), 0, h - crop))
        x0 = int(np.clip(round(com[i, 1] - (crop - 1) / 2), 0, w - crop))
        patch = gray[i, y0 : y0 + crop, x0 : x0 + crop]  # (crop, crop)
        patch = patch.reshape(8, pool, 8, pool).mean(axis=(1, 3))  # (8, 8)
        feats[i] = patch.reshape(64) * 16.0  # (64,), load_digits' 0..16 scale
    return feats


def _render_single_frames(split: str, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image of ``split`` pasted at ``copies`` random places: (N*copies, H, W) in [0, 1]."""
    spec = VideoSpec()
    images, labels = digit_images(split)
    up = upsample_digits(images, spec.digit_size)  # (N, s, s)
    rng = np.random.default_rng(seed)
    frames, ys = [], []
    for _ in range(copies):
        dirs = [DIRECTIONS[k] for k in rng.integers(0, 4, size=len(labels))]
        starts = start_positions(dirs, spec, rng)
        vids = render_videos(up, dirs, starts, spec)  # (N, F, H, W) in [-1, 1]
        f = rng.integers(0, spec.frames)
        frames.append(((vids[:, f] + 1) / 2).numpy())  # (N, H, W)
        ys.append(labels)
    return np.concatenate(frames), np.concatenate(ys)


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """The fitted classifier (scaler + logistic regression), built once per process."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    gray, labels = _render_single_frames("train", copies=3, seed=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    clf.fit(crop_features(gray), labels)
    return clf


def frame_digit_predictions(frames_uint8) -> np.ndarray:
    """Predicted digit per frame, (B, F) int."""
    gray = _gray01(frames_uint8)  # (B, F, H, W)
    b, f, h, w = gray.shape
    pred = digit_classifier().predict(crop_features(gray.reshape(b * f, h, w)))  # (B*F,)
    return pred.reshape(b, f)  # (B, F)


def frame_digit_accuracy_per_sample(frames_uint8, digits) -> np.ndarray:
    """Fraction of each sample's frames recognised as its digit, (B,)."""
    pred = frame_digit_predictions(frames_uint8)  # (B, F)
    return (pred == np.asarray(digits).reshape(-1, 1)).mean(axis=1)


def frame_digit_accuracy(frames_uint8, digits) -> float:
    """Fraction of all frames recognised as the prompted digit."""
    return float(frame_digit_accuracy_per_sample(frames_uint8, digits).mean())


def predict_directions(frames_uint8) -> list[str]:
    """Direction of the least-squares slope of the ink's centre-of-mass track ("none" if too slow)."""
    com = centres_of_mass(_gray01(frames_uint8))  # (B, F, 2)
    t = np.arange(com.shape[1], dtype=np.float64)
    t = t - t.mean()
    slopes = (com * t[None, :, None]).sum(axis=1) / (t**2).sum()  # (B, 2) px/frame (row, col)
    return [direction_of(dy, dx) for dy, dx in slopes]


def direction_of(dy: float, dx: float, min_speed: float = MIN_SPEED) -> str:
    """The named direction of a (row, col) velocity in px/frame: the larger axis wins; "none" if too slow."""
    if max(abs(dy), abs(dx)) < min_speed:
        return "none"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def motion_correct_per_sample(frames_uint8, directions) -> np.ndarray:
    """(B,) booleans: does the centre-of-mass track move the prompted way."""
    return np.array([p == d for p, d in zip(predict_directions(frames_uint8), directions)])


def motion_accuracy(frames_uint8, directions) -> float:
    """Fraction of samples whose centre-of-mass track moves the prompted way."""
    return float(motion_correct_per_sample(frames_uint8, directions).mean())


def real_video_batch(split: str, n: int, seed: int = 0):
    """Real (rendered, not generated) videos as uint8 (B, F, H, W, 3) with digits and directions."""
    vids, _, labels, dirs = DigitVideoSampler(split, seed=seed).batch(n)  # (B, F, H, W) in [-1, 1]
    u8 = ((vids + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, F, H, W)
    return u8[..., None].expand(*u8.shape, 3).contiguous(), labels, dirs  # (B, F, H, W, 3)
