"""The ``flux-tiny`` judge: which digit, which colour, in a generated image.

The background is a dimmed photograph (at most ``ImageSpec.background_level`` on every
channel) and the digit's ink is bright on at least one channel, so the per-pixel maximum over
channels minus the background level isolates the ink. The digit is then read like
``wan2.1-tiny``'s frames (a logistic regression on an 8 x 8 crop around the ink's centre of
mass), trained on the *train* split rendered through the same path, over training photographs;
the colour is the palette entry nearest to the mean colour of the brightest ink pixels.
"""

from __future__ import annotations

import functools

import numpy as np

from ertacache.testbed.image_data import COLOUR_NAMES, COLOURS, DigitImageSampler, ImageSpec, parse_prompt
from ertacache.testbed.judge import crop_features

ATTRIBUTES: tuple[str, ...] = ("digit", "colour")


def _rgb01(frames_uint8) -> np.ndarray:
    """uint8 (B, 1, H, W, 3) or (B, H, W, 3) -> float (B, H, W, 3) in [0, 1]."""
    x = np.asarray(frames_uint8, dtype=np.float32) / 255.0
    if x.ndim == 5:
        if x.shape[1] != 1:
            raise ValueError(f"the image judge reads one frame per sample, got {x.shape[1]}")
        x = x[:, 0]  # (B, H, W, 3)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB images (B, 1, H, W, 3), got shape {x.shape}")
    return x


def ink_map(rgb: np.ndarray, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    """(B, H, W, 3) -> (B, H, W) ink in [0, 1]: the channel maximum above the background's ceiling, rescaled."""
    level = spec.background_level
    return np.clip((rgb.max(axis=-1) - level) / (1.0 - level), 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """Scaler + logistic regression on ink crops of rendered training images, built once per process."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, prompts = DigitImageSampler("train", seed=7).batch(4000)  # (N, 3, H, W) in [-1, 1]
    rgb = ((images.numpy() + 1) / 2).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    labels = [parse_prompt(p)[1] for p in prompts]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000))
    clf.fit(crop_features(ink_map(rgb)), labels)
    return clf


def predict_digits(frames_uint8) -> np.ndarray:
    """(B,) predicted digit per image."""
    return digit_classifier().predict(crop_features(ink_map(_rgb01(frames_uint8))))


def predict_colours(frames_uint8) -> list[str]:
    """(B,) colour names: nearest palette colour to the mean of the ink pixels (the brightest quarter if none)."""
    rgb = _rgb01(frames_uint8)  # (B, H, W, 3)
    ink = ink_map(rgb)  # (B, H, W)
    palette = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (K, 3)
    out = []
    for img, m in zip(rgb, ink):
        mask = m > 0.5
        if mask.sum() < 4:
            mask = m >= np.quantile(m, 0.75)
        mean = img[mask].mean(axis=0)  # (3,)
        out.append(COLOUR_NAMES[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))])
    return out


def correct_per_sample(frames_uint8, prompts: list[str]) -> dict[str, np.ndarray]:
    """{attribute: (B,) booleans}: does each image show its prompt's digit and colour."""
    parsed = [parse_prompt(p) for p in prompts]
    return {"digit": predict_digits(frames_uint8) == np.array([d for _, d in parsed]),
            "colour": np.array([c == want for c, (want, _) in zip(predict_colours(frames_uint8), parsed)])}


def attribute_accuracy(frames_uint8, prompts: list[str]) -> dict[str, float]:
    """{attribute: fraction of images showing the prompted value}."""
    return {a: float(v.mean()) for a, v in correct_per_sample(frames_uint8, prompts).items()}
