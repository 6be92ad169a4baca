"""Package sample images as negatives of the input guard: which part (fit or measure) each goes
to, loading scikit-image's without a download, and crops of them. Shared by the everyday
(:mod:`convert.guard_negatives`) and medical (:mod:`convert.guard_negatives_medical`) categories."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger("convert.guard_negatives")

PARTS = ("fit", "measure")


def _share(items: list, part: str | None) -> list:
    """This part's half of a list of sample images (all of them when ``part`` is None)."""
    return list(items) if part is None else list(items)[PARTS.index(part) :: 2]


def _skimage(names: list[str]) -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        log.warning("scikit-image is not installed: its sample images are left out (pip install scikit-image)")
        return []
    images = []
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception as error:  # some sample images need a download; there is no network
            log.info("skimage.data.%s unavailable: %s", name, error)
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float32)
            array = (255 * (array - array.min()) / max(1e-6, float(np.ptp(array)))).astype(np.uint8)
        images.append(Image.fromarray(array[..., :3] if array.ndim == 3 else array))
    return images


def _crops(images: list[Image.Image], rng: np.random.Generator, per_image: int) -> list[Image.Image]:
    out = []
    for image in images:
        out.append(image)
        for _ in range(per_image):
            w, h = image.size
            cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(image.crop((x, y, x + cw, y + ch)))
    return out
