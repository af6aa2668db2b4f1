"""Conditioning images for image-to-video families: reading a user's file, and the built-in sample images.

An image-conditioned model (Wan2.1 I2V) needs one image per prompt at every stage: ``--image FILE`` on
``ertacache-generate``/``-profile``. Calibration and evaluation need many (prompt, image) pairs; when
none are given they use :func:`sample_images`, crops of the two photographs scikit-learn ships
(``sklearn.datasets.load_sample_images``: a temple in China, a flower), so a profile can be made on a
fresh machine without a dataset. A profile made that way is tuned to those photographs' statistics:
give your own images (``ertacache-profile --image ...``) for a deployment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ertacache.errors import UserError

#: a conditioning image larger than this many pixels is refused (a decompression bomb, not a frame)
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file (PNG, JPEG, ...), with a clear error for anything else."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image {path} does not exist or is not a file; give a PNG or JPEG image")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise UserError(f"--image {path} has {im.width} x {im.height} pixels; give an image under "
                                f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels (it is resized to the video size anyway)")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)
    except UnidentifiedImageError:
        raise UserError(f"--image {path} is not an image PIL can read; give a PNG or JPEG image") from None
    except OSError as e:
        raise UserError(f"--image {path} cannot be read ({e}); give a PNG or JPEG image") from None


def sample_images(n: int, offset: int = 0, size: int = 256) -> list[np.ndarray]:
    """``n`` distinct (size, size, 3) uint8 crops of scikit-learn's two sample photographs.

    Crop k (counting from ``offset``) alternates between the photographs and walks a grid of
    windows over each, so calibration (offset 0) and held-out evaluation (another offset) get
    different images. Deterministic: the same call gives the same crops everywhere.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    out = []
    for k in range(offset, offset + n):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        side = min(h, w) * 3 // 4  # 320 px windows of the 427 x 640 photographs: 3 rows x 5 columns of them
        cols, rows = 5, 3  # 15 windows per photograph, then the walk repeats shifted by half a column step
        j = k // len(photos)
        shift = (j // (cols * rows)) % 2 * side // 8  # half a column step: off the first walk's grid
        y = (j // cols) % rows * (h - side) // (rows - 1)
        x = ((j % cols) * (w - side) // (cols - 1) + shift) % (w - side + 1)
        crop = photo[y : y + side, x : x + side]  # (side, side, 3)
        out.append(_resize(crop, size))
    return out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def images_for(family, n: int, given=None, offset: int = 0) -> list[np.ndarray] | None:
    """One conditioning image per prompt for an image-conditioned ``family``; None for a text-only one.

    ``given`` (the user's ``--image`` files, loaded) are cycled over the ``n`` prompts; without them the
    built-in :func:`sample_images` from ``offset`` (calibration 0, held-out evaluation another range).
    """
    if not family.takes_images:
        if given:
            raise UserError(f"the {family.name} family is not image-conditioned: it takes no --image")
        return None
    if given:
        return [given[k % len(given)] for k in range(n)]
    return sample_images(n, offset)


#: where held-out evaluation images start in :func:`sample_images` (calibration uses 0, 1, ...)
HELD_OUT_IMAGE_OFFSET = 101
