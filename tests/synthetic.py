"""Synthetic CT-like slices for tests: no real data ever enters the test suite.

Two classes a tiny model can separate by texture: ``COVID`` slices have a speckled,
high-frequency "ground glass" inside two lung-shaped ellipses; ``NonCOVID`` slices are smooth.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

POSITIVE, NEGATIVE = "COVID", "NonCOVID"
LABELS = [POSITIVE, NEGATIVE]


def slice_array(label: str, rng: np.random.Generator, height: int = 96, width: int = 128) -> np.ndarray:
    """An 8-bit grey slice: body disc, two dark lungs, texture inside the lungs by label."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height / 2, width / 2
    body = ((yy - cy) / (0.45 * height)) ** 2 + ((xx - cx) / (0.47 * width)) ** 2 <= 1
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((yy - cy) / (0.32 * height)) ** 2 + ((xx - cx - side * 0.2 * width) / (0.14 * width)) ** 2 <= 1
    image = np.where(body, 170.0, 10.0)
    smooth = 40.0 + 20.0 * np.sin(xx / width * np.pi) * np.cos(yy / height * np.pi)
    if label == POSITIVE:
        speckle = rng.uniform(0, 1, size=(height, width)) > 0.5
        texture = smooth + np.where(speckle, 90.0, 0.0)
    else:
        texture = smooth + rng.normal(0, 1.0, size=(height, width))
    image = np.where(lungs, texture, image)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int, seed: int = 0, size: tuple[int, int] = (96, 128)) -> Path:
    """``root/<label>/<n>.png`` with ``per_class`` slices of each class; returns ``root``."""
    rng = np.random.default_rng(seed)
    for label in LABELS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (root / label / f"{label.lower()}_{index:03d}.png").write_bytes(png_bytes(slice_array(label, rng, *size)))
    return root
