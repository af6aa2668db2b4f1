"""A cheap, deterministic judge for ``wan2.1-small`` clips: one verdict per prompt attribute.

The question it answers for a cached sample is the one the tiny testbed's judge answers:
does it still show what the prompt asked for? Each attribute has its own test, so a
caching method that keeps the background but loses the object shows up as such.

Everything keys on *chroma* (max - min of RGB): the generator scales background chroma
by ``SceneSpec.saturation`` (0.4: at most 0.36 on both photos) and draws the prompted
object at chroma >= 0.7, so strongly coloured pixels are the object and the rest is
background (white digit distractors have low chroma too).

* colour: chroma-weighted vote of the object pixels' nearest colour prototype;
* direction: least-squares slope of the object mask's centre-of-mass track;
* shape: logistic regression on a crop of the object mask around its centre of mass,
  per frame, majority vote over frames;
* background: logistic regression on the colour histogram of the background pixels.

The two regressions are fitted once per process (a few seconds) on clips rendered from
the *training* photo regions and digit images, and tested on the held-out ones.
"""

from __future__ import annotations

import functools

import numpy as np

from ertacache.testbed.judge import direction_of
from ertacache.testbed.scene_data import (
    BACKGROUNDS, COLOUR_RGB, COLOURS, SHAPES, SceneSampler, SceneSpec, parse_prompt, to_uint8,
)

CHROMA_MIN = 0.5  # a pixel with max(RGB) - min(RGB) above this counts as object
SOFT_LO, SOFT_HI = 0.4, 0.6  # soft object coverage ramps between these chromas
MIN_OBJECT_PIXELS = 12  # per frame; fewer and the frame shows no object
MIN_SPEED = 0.5  # px/frame; a slower track counts as "none"
POOL = 4  # background features are computed on POOL x POOL cell means
CROP_MARGIN = 8  # the shape crop around the object's centre of mass is object_size + this (px)
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "direction", "background")


def _channels(frames_uint8) -> np.ndarray:
    """uint8 (B, F, H, W, 3) -> float32 (3, B, F, H, W) in [0, 1].

    Channel-first because numpy reduces over a trailing axis of size 3 about 20x slower than
    it combines three contiguous planes elementwise (the judge reads millions of pixels).
    """
    x = np.asarray(frames_uint8)
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, F, H, W, 3), got shape {x.shape}")
    return np.moveaxis(x, -1, 0).astype(np.float32) / 255.0  # (3, B, F, H, W)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) -> (...,) max - min over the colour planes."""
    r, g, b = rgb
    return np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)


_PROTOS = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)  # (K, 3)
_PROTO_DIRS = _PROTOS - _PROTOS.mean(axis=1, keepdims=True)  # (K, 3) chroma direction
_PROTO_DIRS /= np.linalg.norm(_PROTO_DIRS, axis=1, keepdims=True)


def pixel_colours(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) -> (...,) index into COLOURS of the nearest prototype by chroma direction (cosine)."""
    grey = rgb.mean(axis=0)  # (...,)
    d = [rgb[c] - grey for c in range(3)]  # 3 x (...,)
    scores = np.stack([d[0] * p[0] + d[1] * p[1] + d[2] * p[2] for p in _PROTO_DIRS])  # (K, ...)
    return np.argmax(scores, axis=0)  # (...,)


class _Analysis:
    """Per-pixel chroma and colour labels of a batch, and each clip's dominant colour and object mask.

    Computed once per batch and shared by the four attribute judges.
    """

    def __init__(self, frames_uint8):
        rgb = _channels(frames_uint8)  # (3, B, F, H, W)
        self.rgb = rgb
        self.chroma = _chroma(rgb)  # (B, F, H, W)
        labels = pixel_colours(rgb)  # (B, F, H, W)
        n_b, n_f = self.chroma.shape[:2]
        self.colours: list[str] = []
        for b in range(n_b):
            obj = self.chroma[b] > CHROMA_MIN  # (F, H, W)
            if obj.sum() < MIN_OBJECT_PIXELS * n_f / 2:
                self.colours.append("none")
                continue
            votes = np.bincount(labels[b][obj], weights=self.chroma[b][obj], minlength=len(COLOURS))  # (K,)
            self.colours.append(COLOURS[int(np.argmax(votes))])
        # Soft coverage: 0 at the background's chroma ceiling, 1 well inside an object.
        soft = np.clip((self.chroma - SOFT_LO) / (SOFT_HI - SOFT_LO), 0.0, 1.0)  # (B, F, H, W)
        self.masks = np.zeros_like(self.chroma)
        for b, colour in enumerate(self.colours):
            if colour != "none":
                self.masks[b] = soft[b] * (labels[b] == COLOURS.index(colour))


def predict_colours(frames_uint8) -> list[str]:
    """The dominant strong colour of each clip ("none" if too few object pixels)."""
    return _Analysis(frames_uint8).colours


def object_masks(frames_uint8) -> np.ndarray:
    """Soft masks (B, F, H, W) in [0, 1] of each clip's dominant-colour object."""
    return _Analysis(frames_uint8).masks


def _centres(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., H, W) -> centres (..., 2) as (row, col) and masses (...,)."""
    h, w = masks.shape[-2:]
    mass = masks.sum(axis=(-2, -1))  # (...,)
    rows = (masks.sum(axis=-1) * np.arange(h)).sum(axis=-1)
    cols = (masks.sum(axis=-2) * np.arange(w)).sum(axis=-1)
    safe = np.where(mass > 1e-6, mass, 1.0)
    return np.stack([rows / safe, cols / safe], axis=-1), mass


def _directions(a: _Analysis) -> list[str]:
    com, mass = _centres(a.masks)  # (B, F, 2), (B, F)
    out = []
    for b in range(com.shape[0]):
        seen = mass[b] >= MIN_OBJECT_PIXELS / 2  # (F,)
        if seen.sum() < 2:
            out.append("none")
            continue
        t = np.flatnonzero(seen).astype(np.float64)
        t -= t.mean()
        dy, dx = (com[b][seen] * t[:, None]).sum(axis=0) / (t**2).sum()  # px/frame (row, col)
        out.append(direction_of(dy, dx, MIN_SPEED))
    return out


def predict_directions(frames_uint8) -> list[str]:
    """Direction of the object's centre-of-mass track (least squares over the frames that show it)."""
    return _directions(_Analysis(frames_uint8))


def shape_crop(spec: SceneSpec) -> int:
    """Side (px, even) of the window the shape judge reads: the object plus a margin for a drifting centre."""
    return 2 * ((spec.object_size + CROP_MARGIN + 1) // 2)


def shape_features(masks: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W) soft masks -> (N, (crop/2)^2) features: a crop x crop window around the centre, 2x2-pooled."""
    n, h, w = masks.shape
    padded = np.pad(masks, ((0, 0), (crop, crop), (crop, crop)))  # (N, H+2C, W+2C): crops never leave it
    com, _ = _centres(masks)  # (N, 2)
    feats = np.empty((n, (crop // 2) ** 2), dtype=np.float32)
    for i in range(n):
        y0 = int(round(com[i, 0] - (crop - 1) / 2)) + crop
        x0 = int(round(com[i, 1] - (crop - 1) / 2)) + crop
        patch = padded[i, y0:y0 + crop, x0:x0 + crop]  # (crop, crop)
        feats[i] = patch.reshape(crop // 2, 2, crop // 2, 2).mean(axis=(1, 3)).reshape(-1)  # (crop/2 * crop/2,)
    return feats


def _background_features(a: _Analysis) -> np.ndarray:
    """(B, 70): 4x4x4 RGB histogram, mean RGB and RGB std of each clip's background, on 4x4-pooled pixels.

    Pooling first makes the histogram robust to pixel noise (a sample's high-frequency error would
    otherwise spread it over neighbouring bins); a pooled cell counts only if all 16 of its pixels
    are background (no object pixel; white distractors stay in).
    """
    _, n_b, n_f, h, w = a.rgb.shape
    p = POOL
    rgb = a.rgb[..., : h - h % p, : w - w % p]  # (3, B, F, H', W'), H' and W' multiples of p
    rgb = rgb.reshape(3, n_b, n_f, h // p, p, w // p, p).mean(axis=(4, 6))  # (3, B, F, H/p, W/p)
    chroma = a.chroma[..., : h - h % p, : w - w % p].reshape(n_b, n_f, h // p, p, w // p, p)
    keep = chroma.max(axis=(3, 5)) <= SOFT_LO  # (B, F, H/p, W/p)
    bins = np.minimum((rgb * 4).astype(np.int64), 3)  # (3, B, F, H/p, W/p) in 0..3
    code = bins[0] * 16 + bins[1] * 4 + bins[2]  # (B, F, H/p, W/p) in 0..63
    feats = []
    for b in range(n_b):
        px = rgb[:, b][:, keep[b]]  # (3, P)
        hist = np.bincount(code[b][keep[b]], minlength=64) / max(1, px.shape[1])  # (64,)
        stats = np.concatenate([px.mean(axis=1), px.std(axis=1)]) if px.shape[1] else np.zeros(6)
        feats.append(np.concatenate([hist, stats]))
    return np.asarray(feats, dtype=np.float32)


def background_features(frames_uint8) -> np.ndarray:
    """(B, F, H, W, 3) -> (B, 70) features of the background (see _background_features)."""
    return _background_features(_Analysis(frames_uint8))


def _training_analysis(spec: SceneSpec, n: int, seed: int) -> tuple[_Analysis, list]:
    """Rendered training-split clips (photo regions and digits the held-out tests never see)."""
    clips, _, scenes = SceneSampler("train", spec=spec, seed=seed).batch(n)
    return _Analysis(to_uint8(clips)), scenes


def _fit_logistic(x: np.ndarray, y) -> object:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000)).fit(x, y)


@functools.lru_cache(maxsize=4)
def shape_classifier(spec: SceneSpec = SceneSpec()):
    """Scaler + logistic regression from shape_features to SHAPES, fitted on training clips' frames."""
    a, scenes = _training_analysis(spec, 160, seed=101)
    n, f, h, w = a.masks.shape
    y = np.repeat([SHAPES.index(sc.shape) for sc in scenes], f)  # (N*F,)
    return _fit_logistic(shape_features(a.masks.reshape(n * f, h, w), shape_crop(spec)), y)  # frames as samples


@functools.lru_cache(maxsize=4)
def background_classifier(spec: SceneSpec = SceneSpec()):
    """Scaler + logistic regression from background_features to BACKGROUNDS, fitted on training clips."""
    a, scenes = _training_analysis(spec, 160, seed=202)
    return _fit_logistic(_background_features(a), [BACKGROUNDS.index(sc.background) for sc in scenes])


def _shapes(a: _Analysis, spec: SceneSpec) -> list[str]:
    b, f, h, w = a.masks.shape
    feats = shape_features(a.masks.reshape(b * f, h, w), shape_crop(spec))  # (B*F, (crop/2)^2)
    pred = shape_classifier(spec).predict(feats).reshape(b, f)  # (B, F)
    seen = a.masks.sum(axis=(-2, -1)) >= MIN_OBJECT_PIXELS / 2  # (B, F)
    out = []
    for i in range(b):
        votes = np.bincount(pred[i][seen[i]], minlength=len(SHAPES))  # (K,)
        out.append(SHAPES[int(np.argmax(votes))] if seen[i].any() else "none")
    return out


def predict_shapes(frames_uint8, spec: SceneSpec = SceneSpec()) -> list[str]:
    """Majority vote of the per-frame shape verdicts over the frames that show the object."""
    return _shapes(_Analysis(frames_uint8), spec)


def predict_backgrounds(frames_uint8, spec: SceneSpec = SceneSpec()) -> list[str]:
    """The background photo each clip most resembles."""
    pred = background_classifier(spec).predict(background_features(frames_uint8))
    return [BACKGROUNDS[int(k)] for k in pred]


def predict_attributes(frames_uint8, spec: SceneSpec = SceneSpec()) -> dict[str, list[str]]:
    """Every attribute's verdict per clip: {"colour": [...], "shape": [...], "direction": [...], ...}."""
    a = _Analysis(frames_uint8)
    backgrounds = background_classifier(spec).predict(_background_features(a))
    return {"colour": list(a.colours), "shape": _shapes(a, spec), "direction": _directions(a),
            "background": [BACKGROUNDS[int(k)] for k in backgrounds]}


def attributes_correct_per_sample(frames_uint8, prompts: list[str],
                                  spec: SceneSpec = SceneSpec()) -> dict[str, np.ndarray]:
    """(B,) booleans per attribute: does each clip show what its prompt asked for."""
    if len(prompts) != len(frames_uint8):
        raise ValueError(f"{len(frames_uint8)} clips but {len(prompts)} prompts")
    wanted = [parse_prompt(p) for p in prompts]  # (colour, shape, direction, background) each
    pred = predict_attributes(frames_uint8, spec)
    return {a: np.array([pred[a][i] == wanted[i][k] for i in range(len(prompts))])
            for k, a in enumerate(ATTRIBUTES)}


def attribute_accuracy(frames_uint8, prompts: list[str], spec: SceneSpec = SceneSpec()) -> dict[str, float]:
    """Fraction of clips judged correct, per attribute."""
    return {a: float(v.mean()) for a, v in attributes_correct_per_sample(frames_uint8, prompts, spec).items()}
