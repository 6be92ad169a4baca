"""A synthetic axial chest CT slice (a phantom) in Hounsfield units: the appliance's own known input.

The deploy's health check feeds it to ``ctpi predict`` on the Pi and the tests feed it to the
watch daemon and the DICOM node, so it must be a slice the input guard (:mod:`device.core.guard`)
accepts as an axial chest CT, and never a data-set image. It is drawn, deterministically from
a seed, the way a thoracic CT at heart level looks: air around a body on a table line; skin, a
fat layer and chest-wall muscle; ribs, sternum and a vertebra bright; two lungs with vessels
branching from the hilum and faint parenchymal texture; the heart, aorta and oesophagus in the
mediastinum; quantum noise. ``ground_glass=True`` adds peripheral ground-glass opacities, the
typical COVID-19 pattern, so a series can hold slices that look different.

:func:`chest_hounsfield` gives HU (what a DICOM file stores); :func:`chest_png` the same slice
through the lung window of :mod:`device.core.dicom` as an 8-bit PNG, so both decode alike.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from device.core.dicom import LUNG_WINDOW, apply_window

# Hounsfield units of the tissues drawn
AIR, LUNG, FAT, SOFT_TISSUE, BLOOD, BONE_MARROW, CORTICAL_BONE = -1000.0, -860.0, -100.0, 40.0, 45.0, 250.0, 900.0
GROUND_GLASS = -450.0
TABLE = 150.0
NOISE_HU = 14.0
BODY_ASPECT = 1.38  # body width / depth of an adult chest
RENDER_SIDE = 384  # drawn at least this large, then reduced: small slices keep thin vessels and ribs
# Rows x columns: framed tight on the body, as most slices the input guard was fitted on are
# (width about 1.2-1.6 x height). The guard (features v3) sees the body's box, not the frame: in a
# square 512 x 512 frame, air above and below the body, its normalised distance is 0.22 (0.20).
FRAME = (416, 512)
TREES, TREE_DEPTH, DOTS = 2, 3, 120  # vessel trees per hilum, their branching depth, vessels cut across
BLUR = 1.0  # the scanner's point-spread function, pixels of a 512 frame


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean noise with features about ``1/cells`` of the image wide (unit variance)."""
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.asarray(image, dtype=np.float32)
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges repeated): the scanner's point-spread function."""
    reach = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-reach, reach + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = image.shape[axis]
        image = sum(
            weight * (padded[start : start + length] if axis == 0 else padded[:, start : start + length])
            for start, weight in enumerate(kernel)
        )
    return image.astype(np.float32)


def _blobs(shape: tuple[int, int], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Sum of Gaussian blobs (peak 1) at ``centres`` (row, column) with ``radii`` (pixels)."""
    out = np.zeros(shape, dtype=np.float32)
    height, width = shape
    for (row, column), radius in zip(centres, radii, strict=True):
        reach = int(np.ceil(3 * radius))
        top, bottom = max(0, int(row) - reach), min(height, int(row) + reach + 1)
        left, right = max(0, int(column) - reach), min(width, int(column) + reach + 1)
        if top >= bottom or left >= right:
            continue
        ys = np.arange(top, bottom, dtype=np.float32)[:, None] - row
        xs = np.arange(left, right, dtype=np.float32)[None, :] - column
        patch = np.exp(-(ys * ys + xs * xs) / (2 * radius * radius))
        np.maximum(out[top:bottom, left:right], patch, out=out[top:bottom, left:right])
    return out


def _vessel_tree(
    rng: np.random.Generator, hilum: tuple[float, float], side: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centres and radii (pixels) of vessels branching from the hilum outwards and thinning as
    they go; ``scale`` is the body's half width in pixels."""
    centres, radii = [], []
    outward = 0.0 if side > 0 else np.pi
    stack = [(hilum[0], hilum[1], outward + float(rng.uniform(-1.2, 1.2)), 0.014 * scale, 0) for _ in range(TREES)]
    while stack:
        row, column, angle, radius, depth = stack.pop()
        length = scale * float(rng.uniform(0.08, 0.14)) * (0.85**depth)
        steps = max(2, int(length / max(0.6 * radius, 0.5)))
        for step in range(1, steps + 1):
            angle += float(rng.normal(0.0, 0.05))
            row, column = row + np.sin(angle) * length / steps, column + np.cos(angle) * length / steps
            centres.append((row, column))
            radii.append(radius * (1 - 0.25 * step / steps))
        if depth < TREE_DEPTH:
            for turn in (-1, 1):
                stack.append((row, column, angle + turn * float(rng.uniform(0.25, 0.6)), radius * 0.75, depth + 1))
    return np.asarray(centres, dtype=np.float32), np.asarray(radii, dtype=np.float32)


def chest_hounsfield(
    height: int = FRAME[0], width: int = FRAME[1], seed: int = 0, ground_glass: bool = False, wall: float = 1.0
) -> np.ndarray:
    """A ``height x width`` axial chest CT slice at heart level in HU (int16), drawn from ``seed``.

    The display field of view is the usual tight one: the body fills the width of the frame.
    ``wall`` scales the chest wall (fat, muscle, ribs, sternum): 1 is an average adult, 0.4 a thin,
    cachectic patient whose lungs reach almost to the skin (the input guard must take both)."""
    factor = max(1, -(-RENDER_SIDE // max(height, width)))
    rows, columns = height * factor, width * factor
    rng = np.random.default_rng(seed)
    jitter = lambda spread: float(rng.uniform(-spread, spread))  # noqa: E731
    rx = min(columns * (0.55 + jitter(0.01)), rows * 0.46 * BODY_ASPECT)  # the body's half width and half depth
    ry = rx / (BODY_ASPECT + jitter(0.04))
    cy, cx = rows * 0.48, columns * 0.5
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    u, v = (xx - cx) / rx, (yy - cy) / ry  # body coordinates: u to the patient's left, v to the back
    radius = np.sqrt(u * u + np.where(v > 0, np.abs(v) ** 2.4, v * v))  # the back is flattened by the table
    pixel = 1.0 / rx  # one pixel in body units
    inner = lambda r: 1.0 - (1.0 - r) * wall  # noqa: E731  a radius under the skin, for this wall's thickness

    def oval(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2

    image = np.full((rows, columns), AIR, dtype=np.float32)
    table = np.abs(v - (1.0 + 0.10) - 0.05 * u * u) < max(0.012, 1.5 * pixel)
    image[table & (np.abs(u) < 1.15)] = TABLE
    image[radius < 1.0] = SOFT_TISSUE  # skin
    image[radius < 1.0 - max(0.012, pixel)] = FAT
    image[radius < inner(0.91) + jitter(0.01)] = SOFT_TISSUE + 10.0  # chest-wall muscle
    # ribs in the chest wall, sternum in front
    for sign in (-1, 1):
        for angle in np.linspace(-0.42 * np.pi, 0.36 * np.pi, 8) + jitter(0.03):
            rib_u, rib_v = sign * inner(0.84) * np.cos(angle), inner(0.84) * np.sin(angle) * (0.95 if angle > 0 else 1.0)
            rib = oval(rib_u, rib_v, 0.035 * min(1.0, wall), 0.05 * min(1.0, wall))
            image[rib < 1.0] = BONE_MARROW
            image[(rib < 1.0) & (rib > 0.45)] = CORTICAL_BONE
    sternum = oval(0.0, -inner(0.87), 0.09, 0.05 * min(1.0, wall))
    image[sternum < 1.0] = BONE_MARROW
    image[(sternum < 1.0) & (sternum > 0.5)] = CORTICAL_BONE

    # lungs: the pleural cavity less the mediastinum (heart in front, left of centre) and the
    # paravertebral gutter behind
    cavity = radius < inner(0.79) + jitter(0.01)
    central_strip = (np.abs(u - 0.01) < 0.10 + 0.05 * (v > -0.3)) & (v > -0.8) & (v < 0.55)  # narrow in front
    mediastinum = (oval(0.16, -0.12, 0.33, 0.48) < 1.0) | central_strip
    paravertebral = oval(0.0, 0.66, 0.30, 0.32) < 1.0
    lungs = cavity & ~mediastinum & ~paravertebral
    texture = _smooth_noise(rng, rows, columns, 28) * 16.0 + _smooth_noise(rng, rows, columns, 7) * 14.0
    # dependent density: the back of the lungs is a little denser, as in any supine patient
    image[lungs] = LUNG + texture[lungs] + 60.0 * np.clip(v[lungs], 0.0, 1.0) ** 2
    if ground_glass:
        centres = []
        for sign in (-1, 1):
            for _ in range(3):
                angle = float(rng.uniform(-0.3 * np.pi, 0.45 * np.pi))
                centres.append((cy + 0.62 * np.sin(angle) * ry, cx + sign * 0.62 * np.cos(angle) * rx))
        patches = _blobs((rows, columns), np.asarray(centres), np.full(len(centres), 0.09 * rx))
        patches *= np.clip(1.0 + 0.5 * _smooth_noise(rng, rows, columns, 32), 0.0, 1.5)
        image[lungs] += (GROUND_GLASS - LUNG) * np.clip(patches[lungs], 0.0, 1.0)
    # vessels branching from each hilum, and vessels cut across (dots), as bright as blood
    centres, radii = [], []
    for sign in (-1, 1):
        tree_centres, tree_radii = _vessel_tree(rng, (cy + 0.05 * ry, cx + sign * 0.24 * rx), sign, rx)
        centres.append(tree_centres)
        radii.append(tree_radii)
    lung_rows, lung_columns = np.nonzero(lungs)
    picks = rng.choice(lung_rows.size, size=min(lung_rows.size, DOTS), replace=False)
    centres.append(np.stack([lung_rows[picks], lung_columns[picks]], axis=1).astype(np.float32))
    radii.append(rng.uniform(0.003, 0.010, size=picks.size).astype(np.float32) * rx)
    vessels = _blobs((rows, columns), np.concatenate(centres), np.maximum(np.concatenate(radii), 0.7))
    image[lungs] += (BLOOD - image[lungs]) * vessels[lungs]

    # mediastinum: heart (chambers a little brighter with contrast), aortic root, descending
    # aorta beside the spine, oesophagus with a little air
    image[mediastinum & cavity] = SOFT_TISSUE - 20.0  # mediastinal fat and vessels
    heart = oval(0.18, -0.14, 0.30, 0.40)
    image[heart < 1.0] = BLOOD + 5.0
    image[oval(0.22, -0.12, 0.18, 0.26) < 1.0] = BLOOD + 20.0
    image[oval(-0.04, -0.34, 0.08, 0.12) < 1.0] = BLOOD + 15.0
    image[oval(0.11, 0.30, 0.075, 0.105) < 1.0] = BLOOD + 15.0
    image[oval(-0.03, 0.27, 0.04, 0.055) < 1.0] = SOFT_TISSUE
    image[oval(-0.03, 0.27, 0.012, 0.018) < 1.0] = AIR + 200.0
    # the spine: vertebral body with its cortex, canal, lamina and spinous process
    vertebra = oval(0.0, 0.50, 0.12, 0.14)
    image[vertebra < 1.0] = BONE_MARROW
    image[(vertebra < 1.0) & (vertebra > 0.72)] = CORTICAL_BONE
    arch = oval(0.0, 0.72, 0.10, 0.10)
    image[(arch < 1.0) & (arch > 0.4)] = CORTICAL_BONE
    image[arch <= 0.4] = SOFT_TISSUE - 10.0
    image[(np.abs(u) < 0.022) & (v > 0.80) & (v < 0.90)] = CORTICAL_BONE
    for sign in (-1, 1):
        image[oval(sign * 0.14, 0.66, 0.07, 0.035) < 1.0] = CORTICAL_BONE  # transverse processes

    image += rng.normal(0.0, NOISE_HU, size=image.shape).astype(np.float32)
    image = _blur(image, BLUR * max(rows, columns) / 512)
    if factor > 1:
        image = np.asarray(Image.fromarray(image, mode="F").reduce(factor), dtype=np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def chest_png(
    height: int = FRAME[0], width: int = FRAME[1], seed: int = 0, ground_glass: bool = False, wall: float = 1.0
) -> bytes:
    """:func:`chest_hounsfield` through the lung window as an 8-bit grey PNG."""
    windowed = apply_window(chest_hounsfield(height, width, seed, ground_glass, wall), *LUNG_WINDOW)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(windowed).astype(np.uint8), mode="L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
