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
    except Image.DecompressionBombError:
        raise UserError(f"--image {path} declares too many pixels (PIL refuses it as a decompression bomb); give an "
                        f"image under {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except OSError as e:
        raise UserError(f"--image {path} cannot be read ({e}); give a PNG or JPEG image") from None


#: how many distinct crops :func:`sample_images` gives (2 photographs x 36 windows x 2 offsets); it cycles after
SAMPLE_CROPS = 144


def sample_images(n: int, offset: int = 0, size: int = 256, aspect: float = 1.0,
                  held_out: bool = False) -> list[np.ndarray]:
    """``n`` crops of scikit-learn's two sample photographs, (size, round(size * aspect), 3) uint8.

    ``aspect`` (width / height): the video's, so the crop is not stretched when it is resized to the
    video. Crop k (counting from ``offset``) alternates between the photographs and walks a 9 x 4 grid
    of windows over each, then the same grid shifted by half a step: :data:`SAMPLE_CROPS` distinct
    crops, then the walk repeats. ``held_out``: the crops mirrored left to right, so held-out
    evaluation never sees a calibration image. Deterministic: the same call gives the same crops.
    """
    from sklearn.datasets import load_sample_images

    if not (0.1 <= aspect <= 10):
        raise ValueError(f"aspect (width / height) must be between 0.1 and 10, got {aspect}")
    photos = load_sample_images().images  # two (427, 640, 3) uint8 arrays
    cols, rows = 9, 4
    out = []
    for k in range(offset, offset + n):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        wh = int(min(h, w / aspect) * 0.75)  # window height; the width follows the aspect
        ww = max(1, min(w, round(wh * aspect)))
        j = (k // len(photos)) % (SAMPLE_CROPS // len(photos))
        half = j // (cols * rows)  # 0: the grid, 1: the grid shifted by half a step
        cell = j % (cols * rows)
        y = ((cell // cols) * 2 + half) * (h - wh) // (2 * rows - 1)
        x = ((cell % cols) * 2 + half) * (w - ww) // (2 * cols - 1)
        crop = photo[y : y + wh, x : x + ww]  # (wh, ww, 3)
        if held_out:
            crop = crop[:, ::-1]
        out.append(_resize(crop, size, max(1, round(size * aspect))))
    return out


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def images_for(family, n: int, given=None, held_out: bool = False, size: tuple[int, int, int] | None = None):
    """One conditioning image per prompt for an image-conditioned ``family``; None for a text-only one.

    ``given`` (the user's ``--image`` files, loaded) are cycled over the ``n`` prompts; without them the
    built-in :func:`sample_images` (``held_out``: the mirrored ones, for evaluation) cropped to the
    aspect of ``size`` = (frames, height, width) when given.
    """
    if not family.takes_images:
        if given:
            raise UserError(f"the {family.name} family is not image-conditioned: it takes no --image")
        return None
    if given:
        return [given[k % len(given)] for k in range(n)]
    aspect = 1.0 if size is None else size[2] / size[1]
    return sample_images(n, aspect=aspect, held_out=held_out)
