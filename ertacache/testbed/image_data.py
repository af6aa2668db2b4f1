"""Synthetic text-conditioned images for the ``flux-tiny`` testbed: coloured digits on photographs.

The FLUX testbed needs an *image* task that a small ``FluxTransformer2DModel`` learns on 2 CPU
cores in under an hour, that a cheap judge can check, and whose pixels are not mostly flat
black (texture everywhere keeps PSNR honest). Each 32 x 32 RGB image shows one handwritten
``load_digits`` digit (16 x 16) painted in one of four colours over a dimmed, desaturated
window of one of scikit-learn's two sample photographs; the prompt names the colour and the
digit: ``"red digit 3"``. The background is a nuisance the model must reproduce, not an
attribute: the judge reads digit and colour.

Held-out images use held-out handwriting (the digit split of :mod:`ertacache.testbed.data`)
and the held-out strip of each photograph (:func:`ertacache.testbed.scene_data.photo_region`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ertacache.errors import PromptError
from ertacache.testbed.data import DIGITS, cycle_shuffled, digit_images, upsample_digits

#: the digit colours as RGB in [0, 1]; bright on at least one channel, so the ink stands above the background
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.3, 0.4, 1.0), "yellow": (1.0, 1.0, 0.15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PROMPT_TEMPLATE = "{colour} digit {digit}"
#: every word of the grammar (the text encoder's vocabulary after its pad token)
VOCABULARY: tuple[str, ...] = ("digit", *[str(d) for d in DIGITS], *COLOUR_NAMES)


@dataclass(frozen=True)
class ImageSpec:
    """Geometry and look of one image (validated).

    ``grid``: the digit's corner snaps to multiples of it; 8 px = a few sub-token offsets for
    the model (pixel VAE 2 x packing 2 x patch 1 = 4 px per token), as for ``wan2.1-tiny``.
    ``background_level``: the brightest background value; the digit ink is brighter.
    """

    height: int = 32
    width: int = 32
    digit_size: int = 16
    grid: int = 8
    background_level: float = 0.4
    photo_scale: float = 0.25
    train_fraction: float = 0.75
    saturation: float = 0.3

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.digit_size, self.grid) <= 0:
            raise ValueError(f"ImageSpec sizes must be positive: {self}")
        if self.digit_size > min(self.height, self.width):
            raise ValueError(f"a {self.digit_size} px digit does not fit a {self.height}x{self.width} image")
        if not 0 <= self.background_level < 0.6:
            raise ValueError("background_level must be in [0, 0.6) so the ink stays brighter than the background "
                             "(0: black, no photograph)")


def make_prompt(colour: str, digit: int) -> str:
    """``"red digit 3"``: the one template the flux-tiny text encoder knows."""
    if colour not in COLOURS:
        raise PromptError(f"colour must be one of {list(COLOUR_NAMES)}, got {colour!r}")
    if int(digit) not in DIGITS:
        raise PromptError(f"digit must be one of {DIGITS}, got {digit!r}")
    return PROMPT_TEMPLATE.format(colour=colour, digit=int(digit))


def parse_prompt(prompt: str) -> tuple[str, int]:
    """Inverse of :func:`make_prompt`: (colour, digit); a ValueError on anything else."""
    words = prompt.strip().lower().split()
    if len(words) != 3 or words[1] != "digit" or words[0] not in COLOURS or not words[2].isdigit():
        raise PromptError(f"prompt must look like 'red digit 3' (colours: {', '.join(COLOUR_NAMES)}), got {prompt!r}")
    if int(words[2]) not in DIGITS:
        raise PromptError(f"unknown digit in prompt {prompt!r}")
    return words[0], int(words[2])


def all_prompts() -> list[str]:
    """Every prompt (4 colours x 10 digits = 40)."""
    return [make_prompt(c, d) for c in COLOUR_NAMES for d in DIGITS]


def calibration_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """A deterministic, balanced prompt list for cache calibration."""
    return cycle_shuffled(all_prompts(), n, np.random.default_rng(30_000 + seed))


def held_out_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """Evaluation prompts, from a stream disjoint from the calibration one."""
    return cycle_shuffled(all_prompts(), n, np.random.default_rng(40_000 + seed))


CALIBRATION_SEEDS: tuple[int, ...] = tuple(range(0, 100))
HELD_OUT_SEEDS: tuple[int, ...] = tuple(range(1000, 1100))


def _background_regions(split: str, spec: ImageSpec) -> list[np.ndarray]:
    """Both photographs' ``split`` strips, desaturated and dimmed to [0, background_level]: (h, w', 3) each."""
    from ertacache.testbed.scene_data import BACKGROUNDS, SceneSpec, photo_region

    scene = SceneSpec(frames=1, height=spec.height, width=spec.width, object_size=spec.digit_size, max_pan=0,
                      photo_scale=spec.photo_scale, train_fraction=spec.train_fraction, saturation=spec.saturation)
    return [photo_region(bg, split, scene) * spec.background_level for bg in BACKGROUNDS]


class DigitImageSampler:
    """Draws (image, prompt) batches from one split; digits are upsampled once, so a batch costs milliseconds."""

    def __init__(self, split: str = "train", spec: ImageSpec | None = None, seed: int = 0):
        self.spec = spec or ImageSpec()
        images, self.labels = digit_images(split)
        self.digits_hw = upsample_digits(images, self.spec.digit_size).numpy()  # (N, s, s) in [0, 1]
        self.backgrounds = _background_regions(split, self.spec)
        self.rng = np.random.default_rng(seed)

    def render(self, digit_index: int, colour: str, corner: tuple[int, int], background: int,
               window: tuple[int, int]) -> np.ndarray:
        """One image (3, H, W) in [0, 1]: the photo window, with the coloured digit alpha-blended on top."""
        sp = self.spec
        y, x = window
        bg = self.backgrounds[background][y : y + sp.height, x : x + sp.width]  # (H, W, 3)
        img = bg.copy()
        alpha = self.digits_hw[digit_index][..., None]  # (s, s, 1)
        cy, cx = corner
        patch = img[cy : cy + sp.digit_size, cx : cx + sp.digit_size]  # (s, s, 3), a view
        patch[:] = patch * (1 - alpha) + np.asarray(COLOURS[colour], dtype=np.float32) * alpha
        return img.transpose(2, 0, 1)  # (3, H, W)

    def batch(self, batch_size: int, prompts: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, H, W) in [-1, 1] and their prompts (random, or the given ones with random handwriting)."""
        sp, rng = self.spec, self.rng
        if prompts is None:
            prompts = [make_prompt(COLOUR_NAMES[rng.integers(len(COLOURS))], int(rng.integers(10)))
                       for _ in range(batch_size)]
        corners = np.arange(0, sp.height - sp.digit_size + 1, sp.grid)
        out = np.empty((len(prompts), 3, sp.height, sp.width), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            colour, digit = parse_prompt(prompt)
            idx = rng.choice(np.flatnonzero(self.labels == digit))
            b = int(rng.integers(len(self.backgrounds)))
            region = self.backgrounds[b]
            window = (int(rng.integers(region.shape[0] - sp.height + 1)),
                      int(rng.integers(region.shape[1] - sp.width + 1)))
            corner = (int(rng.choice(corners)), int(rng.choice(corners)))
            out[i] = self.render(idx, colour, corner, b, window)
        return torch.from_numpy(out) * 2.0 - 1.0, list(prompts)


def real_image_batch(split: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Real (rendered) images as uint8 frames (B, 1, H, W, 3), the generator's output layout, with prompts."""
    images, prompts = DigitImageSampler(split, seed=seed).batch(n)  # (B, 3, H, W) in [-1, 1]
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    return u8.permute(0, 2, 3, 1).unsqueeze(1).numpy(), prompts  # (B, 1, H, W, 3)
