"""Synthetic coloured video scenes for the ``wan2.1-small`` testbed.

``wan2.1-tiny`` (one white digit on black) sits in a near-lossless caching regime: most
pixels are flat, trajectories are smooth. This generator makes clips closer to what a
real video model sees, while staying offline, cheap and judgeable:

* a **textured, panning background**: a window over one of scikit-learn's bundled
  sample photographs (``load_sample_images``: a temple, a flower), moving 0-1 px per
  frame in a random direction (camera motion). Colours are kept but their saturation is
  scaled down, so that the prompted object is the only strongly saturated thing in the
  frame and a cheap colour-keyed judge can find it;
* a **prompted object**: a solid shape of a prompted colour gliding in a prompted
  direction on top;
* an **unprompted distractor**: a white handwritten digit (``load_digits``) drifting
  its own way, so the model must place several objects and move them independently.

Prompts name four attributes, ``"red circle moving left on flower"``. Two splits keep
the judge honest: photo *regions* (the left part of each photo for training, the right
part held out) and digit images (the tiny testbed's split).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ertacache.testbed.data import digit_images, upsample_digits

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
# Pure-ish RGB in [0, 1]: saturation > 0.85, four hues 60-120 degrees apart.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10), "green": (0.10, 0.82, 0.12),
    "blue": (0.12, 0.25, 0.95), "yellow": (0.95, 0.88, 0.08),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: tuple[str, ...] = ("temple", "flower")
# sklearn.datasets.load_sample_images() returns the photos in this order.
_PHOTO_FILES = {"temple": "china.jpg", "flower": "flower.jpg"}
_DIRECTION_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx), rows grow down

PROMPT_TEMPLATE = "{colour} {shape} moving {direction} on {background}"
# The words a prompt may contain (the text encoder's vocabulary, pad excluded).
VOCABULARY: tuple[str, ...] = (*COLOURS, *SHAPES, "moving", *DIRECTIONS, "on", *BACKGROUNDS)


@dataclass(frozen=True)
class SceneSpec:
    """Geometry and look of one clip; validated so bad combinations fail before rendering.

    The defaults give 8 frames of 64x64 RGB: with the pixel VAE (space-to-depth 4) and
    Wan's (1, 2, 2) patches that is 8 x 8 x 8 = 512 tokens per sample, each token 8 x 8 px.

    Why a 32 px object moving 4 px per frame: two CPU training runs with a 16 px object (2 x 2
    tokens) moving 2 px per frame learned colour and background but left shape and direction at
    chance; the model painted the colour as token-sized fragments (``docs/testbed.md``). At 4 x 4
    tokens a shape is a pattern over tokens, not inside two of them, and a 28 px track is a
    direction the centre of mass cannot miss.
    """

    frames: int = 8
    height: int = 64
    width: int = 64
    object_size: int = 32
    speed: int = 4  # px per frame of the prompted object along its direction
    distractor_size: int = 16  # px of each white digit distractor
    distractor_speed: int = 1  # px per frame of the digit distractor
    distractors: int = 1  # white digits drawn under the prompted object (0 = none)
    max_pan: int = 1  # camera pan: each axis moves a random integer in [-max_pan, max_pan] px per frame
    # Start corners snap to multiples of ``grid`` px (8 = one token) off the motion axis, as
    # for wan2.1-tiny: a patch transformer learns a few sub-token offsets much faster than all.
    grid: int = 8
    photo_scale: float = 0.5  # photos (427 x 640) are resized by this before windows are cut
    train_fraction: float = 0.7  # left part of each (resized) photo used for training windows
    saturation: float = 0.4  # background chroma is scaled by this (objects keep full colour)

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width, self.object_size, self.speed, self.grid,
               self.distractor_size) <= 0:
            raise ValueError(f"frames, height, width, object_size, distractor_size, speed and grid must be "
                             f"positive: {self}")
        if self.distractors < 0 or self.distractor_speed < 0 or self.max_pan < 0:
            raise ValueError("distractors, distractor_speed and max_pan must be >= 0")
        for what, size, travel in (("an object", self.object_size, self.travel),
                                   ("a distractor", self.distractor_size, self.distractor_speed * (self.frames - 1))):
            if size + travel > min(self.height, self.width):
                raise ValueError(f"{what} of size {size} moving {travel} px does not fit a "
                                 f"{self.height}x{self.width} canvas; lower speed or frames, or enlarge the canvas")
        if not 0 < self.photo_scale <= 1 or not 0 < self.train_fraction < 1 or not 0 <= self.saturation <= 1:
            raise ValueError("photo_scale must be in (0, 1], train_fraction in (0, 1), saturation in [0, 1]")
        pan = self.max_pan * (self.frames - 1)
        h, w = round(427 * self.photo_scale), round(640 * self.photo_scale)
        train_w = int(w * self.train_fraction)
        if self.height + pan > h or self.width + pan > min(train_w, w - train_w):
            raise ValueError(f"a {self.height}x{self.width} window panning {pan} px does not fit both photo "
                             f"regions ({h} x {train_w} and {h} x {w - train_w}); raise photo_scale")

    @property
    def travel(self) -> int:
        """Pixels the prompted object moves between the first and the last frame."""
        return self.speed * (self.frames - 1)


class UnknownPromptError(ValueError):
    """A prompt outside the template or vocabulary (ValueError so callers of the tiny testbed's API agree)."""


def make_prompt(colour: str, shape: str, direction: str, background: str) -> str:
    """The one template the small testbed knows: ``"red circle moving left on flower"``."""
    for name, value, allowed in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                 ("direction", direction, DIRECTIONS), ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise UnknownPromptError(f"{name} must be one of {allowed}, got {value!r}")
    return PROMPT_TEMPLATE.format(colour=colour, shape=shape, direction=direction, background=background)


def parse_prompt(prompt: str) -> tuple[str, str, str, str]:
    """Inverse of :func:`make_prompt`: (colour, shape, direction, background)."""
    words = prompt.strip().lower().split()
    if len(words) != 6 or words[2] != "moving" or words[4] != "on":
        raise UnknownPromptError(f"prompt must look like {make_prompt('red', 'circle', 'left', 'flower')!r}, "
                                 f"got {prompt!r}")
    colour, shape, _, direction, _, background = words
    make_prompt(colour, shape, direction, background)  # validates each attribute
    return colour, shape, direction, background


def all_prompts() -> list[str]:
    """Every prompt (4 colours x 4 shapes x 4 directions x 2 backgrounds = 128)."""
    return [make_prompt(c, s, d, b) for c in COLOURS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS]


def calibration_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """A deterministic prompt list; every 16 consecutive prompts are balanced in all four attributes."""
    return _balanced_prompts(n, np.random.default_rng(30_000 + seed))


def held_out_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """Evaluation prompts, drawn with a different stream than calibration prompts (same balance)."""
    return _balanced_prompts(n, np.random.default_rng(40_000 + seed))


def _balanced_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """All 128 prompts in 8 blocks of 16 (block order and order inside a block shuffled), repeated as needed.

    Block k holds every (colour, shape) pair once with direction (c + s + k) mod 4 and
    background (c + s + k // 4) mod 2, so each block has every colour and shape 4 times,
    every direction 4 times and each background 8 times, and the 8 blocks together hold
    every prompt exactly once. A judged sample of 16 or 48 prompts is then balanced.
    """
    blocks = []
    for k in range(8):
        blocks.append([make_prompt(COLOURS[c], SHAPES[s], DIRECTIONS[(c + s + k) % 4],
                                   BACKGROUNDS[(c + s + k // 4) % 2])
                       for c in range(len(COLOURS)) for s in range(len(SHAPES))])
    out: list[str] = []
    while len(out) < n:
        for k in rng.permutation(len(blocks)):
            out.extend(blocks[k][j] for j in rng.permutation(len(blocks[k])))
    return out[:n]


# Noise seeds: calibration and evaluation streams kept disjoint by convention (as for wan2.1-tiny).
CALIBRATION_SEEDS: tuple[int, ...] = tuple(range(0, 100))
HELD_OUT_SEEDS: tuple[int, ...] = tuple(range(1000, 1100))


# ----------------------------------------------------------------------------- pixels

@functools.lru_cache(maxsize=4)
def _photos(scale: float) -> dict[str, np.ndarray]:
    """The two sample photographs resized by ``scale``, float32 (H, W, 3) in [0, 1]."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    by_file = {name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]: img for name, img in zip(bunch.filenames, bunch.images)}
    out = {}
    for bg, fname in _PHOTO_FILES.items():
        img = torch.tensor(np.array(by_file[fname]), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0  # (1, 3, H, W)
        size = (round(img.shape[2] * scale), round(img.shape[3] * scale))
        img = F.interpolate(img, size=size, mode="area")  # (1, 3, h, w): area = anti-aliased downscale
        out[bg] = img[0].permute(1, 2, 0).contiguous().numpy()  # (h, w, 3)
    return out


def photo_region(background: str, split: str, spec: SceneSpec) -> np.ndarray:
    """The part of a photo that ``split`` may cut windows from, (h, w', 3) in [0, 1], desaturated."""
    if background not in BACKGROUNDS:
        raise UnknownPromptError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    photo = _photos(spec.photo_scale)[background]  # (h, w, 3)
    cut = int(photo.shape[1] * spec.train_fraction)
    if split == "train":
        region = photo[:, :cut]
    elif split in ("held_out", "heldout", "test"):
        region = photo[:, cut:]
    else:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    grey = region.mean(axis=-1, keepdims=True)  # (h, w', 1)
    return (grey + spec.saturation * (region - grey)).astype(np.float32)  # (h, w', 3)


def _supersampled(mask_fn, size: int, factor: int = 4) -> np.ndarray:
    """Anti-aliased (size, size) coverage in [0, 1] of the set ``mask_fn(y, x)`` on [-1, 1]^2."""
    n = size * factor
    c = (np.arange(n) + 0.5) / n * 2 - 1  # sample centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")  # (n, n)
    m = mask_fn(y, x).astype(np.float32)  # (n, n)
    return m.reshape(size, factor, size, factor).mean(axis=(1, 3))  # (size, size)


@functools.lru_cache(maxsize=8)
def shape_masks(size: int) -> dict[str, np.ndarray]:
    """Coverage masks (size, size) in [0, 1] of every shape, each filling most of its box."""
    r = 0.9
    return {
        "circle": _supersampled(lambda y, x: x**2 + y**2 <= r**2, size),
        "square": _supersampled(lambda y, x: (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8), size),
        # apex up, base at the bottom: |x| grows linearly from the top (y = -r) to the base (y = r)
        "triangle": _supersampled(lambda y, x: (y <= r) & (np.abs(x) <= (y + r) / 2), size),
        "cross": _supersampled(lambda y, x: ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3)) & (np.abs(x) <= r)
                               & (np.abs(y) <= r), size),
    }


def _start_on_axis(step: int, free: int, travel: int, grid: int, rng: np.random.Generator) -> int:
    """A start coordinate on one axis keeping the whole track in [0, free]; on the grid when one fits."""
    lo, hi = (0, free) if step == 0 else (0, free - travel)
    if step < 0:
        lo, hi = lo + travel, hi + travel
    values = np.arange(lo, hi + 1)
    on_grid = values[values % grid == 0]
    return int(rng.choice(on_grid if len(on_grid) else values))


@dataclass(frozen=True)
class Scene:
    """Everything random about one clip (so a clip can be re-rendered and tests can check ground truth)."""

    colour: str
    shape: str
    direction: str
    background: str
    start: tuple[int, int]  # prompted object's top-left corner at frame 0 (y, x)
    window: tuple[int, int]  # background window's top-left corner at frame 0 (y, x) in the photo region
    pan: tuple[int, int]  # background window's motion per frame (dy, dx)
    distractors: tuple[tuple[int, int, int, int, int], ...]  # (digit image index, y0, x0, dy, dx) each

    @property
    def prompt(self) -> str:
        return make_prompt(self.colour, self.shape, self.direction, self.background)


class SceneSampler:
    """Draws random (clip, prompt) batches from one split (photo regions and digit images).

    Photos, shape masks and digit images are prepared once; a batch of 32 clips costs a
    few tens of milliseconds, negligible next to a training step.
    """

    def __init__(self, split: str = "train", spec: SceneSpec | None = None, seed: int = 0):
        self.spec = spec or SceneSpec()
        self.split = split
        self.regions = {b: photo_region(b, split, self.spec) for b in BACKGROUNDS}  # each (h, w', 3)
        digits, _ = digit_images(split)
        self.digits = upsample_digits(digits, self.spec.distractor_size).numpy()  # (N, d, d) in [0, 1]
        self.masks = shape_masks(self.spec.object_size)
        self.rng = np.random.default_rng(seed)

    def draw_scene(self, colour: str | None = None, shape: str | None = None, direction: str | None = None,
                   background: str | None = None) -> Scene:
        """A random scene; any attribute given is fixed, the rest drawn uniformly."""
        spec, rng = self.spec, self.rng
        colour = colour or COLOURS[rng.integers(len(COLOURS))]
        shape = shape or SHAPES[rng.integers(len(SHAPES))]
        direction = direction or DIRECTIONS[rng.integers(len(DIRECTIONS))]
        background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        make_prompt(colour, shape, direction, background)  # validate
        dy, dx = _DIRECTION_STEP[direction]
        fy, fx = spec.height - spec.object_size, spec.width - spec.object_size
        start = (_start_on_axis(dy, fy, spec.travel, spec.grid, rng),
                 _start_on_axis(dx, fx, spec.travel, spec.grid, rng))
        pan = tuple(int(v) for v in rng.integers(-spec.max_pan, spec.max_pan + 1, size=2))
        rh, rw, _ = self.regions[background].shape
        window = (_start_on_axis(pan[0], rh - spec.height, abs(pan[0]) * (spec.frames - 1), 1, rng),
                  _start_on_axis(pan[1], rw - spec.width, abs(pan[1]) * (spec.frames - 1), 1, rng))
        distractors = []
        dtravel = spec.distractor_speed * (spec.frames - 1)
        gy, gx = spec.height - spec.distractor_size, spec.width - spec.distractor_size
        for _ in range(spec.distractors):
            ddy, ddx = [(0, 0), *_DIRECTION_STEP.values()][rng.integers(5)]
            distractors.append((int(rng.integers(len(self.digits))),
                                _start_on_axis(ddy, gy, dtravel, 1, rng), _start_on_axis(ddx, gx, dtravel, 1, rng),
                                ddy, ddx))
        return Scene(colour, shape, direction, background, start, window, pan, tuple(distractors))

    def render(self, scene: Scene) -> np.ndarray:
        """One clip, float32 (F, H, W, 3) in [0, 1]: background window, distractors, then the object."""
        spec = self.spec
        s, d, n_f, h, w = spec.object_size, spec.distractor_size, spec.frames, spec.height, spec.width
        region = self.regions[scene.background]
        clip = np.empty((n_f, h, w, 3), dtype=np.float32)  # (F, H, W, 3)
        dy, dx = _DIRECTION_STEP[scene.direction]
        mask = self.masks[scene.shape][..., None]  # (s, s, 1)
        colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32)  # (3,)
        for f in range(n_f):
            wy, wx = scene.window[0] + scene.pan[0] * f, scene.window[1] + scene.pan[1] * f
            clip[f] = region[wy:wy + h, wx:wx + w]
            for idx, y0, x0, ddy, ddx in scene.distractors:
                y, x = y0 + ddy * spec.distractor_speed * f, x0 + ddx * spec.distractor_speed * f
                alpha = self.digits[idx][..., None]  # (d, d, 1) digit ink as coverage
                patch = clip[f, y:y + d, x:x + d]  # (d, d, 3) view
                patch += alpha * (0.95 - patch)  # white ink over the background
            y, x = scene.start[0] + dy * spec.speed * f, scene.start[1] + dx * spec.speed * f
            patch = clip[f, y:y + s, x:x + s]
            patch += mask * (colour - patch)
        return clip

    def batch(self, batch_size: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """Clips (B, 3, F, H, W) in [-1, 1] (the pixel VAE's input layout), prompts, scenes."""
        scenes = [self.draw_scene() for _ in range(batch_size)]
        clips = np.stack([self.render(sc) for sc in scenes])  # (B, F, H, W, 3)
        x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)  # (B, 3, F, H, W)
        return x * 2.0 - 1.0, [sc.prompt for sc in scenes], scenes


def to_uint8(clips: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, H, W, 3), the layout decoders return."""
    u8 = ((clips.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 4, 1).contiguous()


def real_clip_batch(split: str, n: int, seed: int = 0, spec: SceneSpec | None = None):
    """Rendered (not generated) clips as uint8 (B, F, H, W, 3), with their scenes."""
    clips, _, scenes = SceneSampler(split, spec=spec, seed=seed).batch(n)
    return to_uint8(clips), scenes
