"""Occlusion sensitivity: which regions of a slice move the model's positive probability.

The Pi runs a TFLite model with no gradients, so the heatmap is model-agnostic (Zeiler and
Fergus 2014): the preprocessed slice is cut into a coarse ``grid x grid`` of patches, each
copy has one patch replaced by the slice's mean grey, each copy goes through the same
:class:`~device.core.classifier.Classifier` that made the prediction, and a patch's value is how
much hiding it lowers the positive probability. Positive values: the region pushed the model
towards the positive label; negative: away from it. Cost is ``grid**2`` invokes (49 by
default, a few seconds for MobileNetV2 int8 on a Pi 4); nothing is kept between calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_GRID = 7
# Changes of P below NOISE are not drawn at all; above it the map is normalised per image to
# its largest change, but never to less than COLOUR_FLOOR, so a 0.02 wiggle is not stretched
# to full colour as if it were an explanation.
NOISE = 0.01
COLOUR_FLOOR = 0.03
OPACITY = 0.85
OVERLAY_ROWS = 32
# Evidence for the positive label: a perceptual ramp (inferno's upper half: purple, red,
# orange, pale yellow) whose lightness rises with the evidence, so the strongest region is the
# brightest on dark lung as on grey tissue. Evidence against it: navy to cyan.
POSITIVE_STOPS = np.array([[120, 28, 109], [187, 55, 84], [237, 105, 37], [251, 180, 26], [252, 255, 164]], np.float64)
NEGATIVE_STOPS = np.array([[35, 45, 120], [30, 90, 190], [40, 150, 230], [110, 215, 250]], np.float64)


@dataclass(frozen=True)
class Heatmap:
    sensitivity: np.ndarray  # H x W float32, in probability units, same size as the model input
    coarse: np.ndarray  # grid x grid float32, the measured values
    base_probability: float  # P(positive) of the intact slice
    invokes: int
    seconds: float


def patch_edges(size: int, grid: int) -> np.ndarray:
    """``grid + 1`` integer edges splitting ``size`` pixels into near-equal patches."""
    return np.linspace(0, size, grid + 1).round().astype(int)


def _patches(pixels: np.ndarray, grid: int) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """The fill (the slice's mean grey) and the ``grid**2`` patches, row by row."""
    height, width = pixels.shape[:2]
    if grid < 1 or grid > min(height, width):
        raise ValueError(f"heatmap grid {grid} does not fit a {height}x{width} input (use 1..{min(height, width)})")
    fill = np.rint(pixels.reshape(-1, pixels.shape[-1]).mean(axis=0)).astype(pixels.dtype)
    rows, columns = patch_edges(height, grid), patch_edges(width, grid)
    return fill, [(slice(rows[i], rows[i + 1]), slice(columns[j], columns[j + 1])) for i in range(grid) for j in range(grid)]


def occluded_copies(pixels: np.ndarray, grid: int) -> np.ndarray:
    """``grid**2`` copies of an ``H x W x C`` uint8 slice, copy ``i * grid + j`` with patch
    (row i, column j) filled with the slice's mean grey."""
    fill, patches = _patches(pixels, grid)
    batch = np.repeat(pixels[None, ...], len(patches), axis=0)
    for index, (rows, columns) in enumerate(patches):
        batch[index, rows, columns] = fill
    return batch


def occlusion_map(classifier, pixels: np.ndarray, grid: int = DEFAULT_GRID) -> Heatmap:
    """Occlusion sensitivity of ``classifier``'s positive probability for one preprocessed
    slice (the ``H x W x C`` uint8 array the model takes)."""
    start = time.perf_counter()
    positive = classifier.bundle.positive_index
    base = float(classifier.probabilities(pixels)[positive])
    # One occluded copy at a time, not the grid**2 batch of occluded_copies (2.4 MB at 224x224,
    # alive beside the interpreter in the DICOM node's peak): the same invokes on the same
    # copies, so the same values as probabilities_batch gives.
    fill, patches = _patches(pixels, grid)
    copy = np.empty_like(pixels)
    scores = []
    for rows, columns in patches:
        copy[...] = pixels
        copy[rows, columns] = fill
        scores.append(classifier.probabilities(copy)[positive])
    occluded = np.array(scores)
    coarse = (base - occluded).reshape(grid, grid).astype(np.float32)
    return Heatmap(
        sensitivity=sensitivity_map(coarse, pixels.shape[:2]),
        coarse=coarse,
        base_probability=base,
        invokes=grid * grid + 1,
        seconds=time.perf_counter() - start,
    )


def sensitivity_map(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The full-size ``H x W`` float32 map of a ``grid x grid`` coarse map (bilinear). Apart
    from :func:`occlusion_map` so that the DICOM node draws, from the coarse grid the watch
    daemon stored in the journal, the very map the page computes, without a model (#19)."""
    height, width = shape
    smooth = Image.fromarray(np.asarray(coarse, dtype=np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32)


def colour_scale(sensitivity: np.ndarray) -> float:
    """The change of P drawn at full colour for this map (its largest, at least COLOUR_FLOOR)."""
    return max(float(np.abs(sensitivity).max()), COLOUR_FLOOR)


def strength(sensitivity: np.ndarray, scale: float) -> np.ndarray:
    """Signed evidence in [-1, 1]: 0 up to NOISE, 1 at ``scale``."""
    magnitude = np.clip((np.abs(sensitivity) - NOISE) / max(scale - NOISE, 1e-9), 0.0, 1.0)
    return np.sign(sensitivity) * magnitude


def colours(values: np.ndarray) -> np.ndarray:
    """RGB (float 0..255) of signed evidence values in [-1, 1] (``... x 3``)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(values.shape + (3,))
    for stops, side in ((POSITIVE_STOPS, values >= 0), (NEGATIVE_STOPS, values < 0)):
        position = np.abs(values[side]) * (len(stops) - 1)
        low = np.clip(np.floor(position).astype(int), 0, len(stops) - 2)
        fraction = (position - low)[..., None]
        out[side] = stops[low] * (1 - fraction) + stops[low + 1] * fraction
    return out


def legend(steps: int = 11) -> list[tuple[float, tuple[int, int, int]]]:
    """Colour-bar stops ``(signed evidence -1..1, rgb)`` from most negative to most positive,
    for a legend beside the overlay (multiply by :func:`colour_scale` for units of P)."""
    values = np.linspace(-1.0, 1.0, steps)
    return [(float(v), tuple(int(round(c)) for c in rgb)) for v, rgb in zip(values, colours(values), strict=True)]


def overlay(pixels: np.ndarray, sensitivity: np.ndarray, opacity: float = OPACITY) -> np.ndarray:
    """The slice in grey with the map blended on top, as ``H x W x 3`` uint8 ready for display:
    normalised per image (:func:`colour_scale`), opacity proportional to the evidence, warm
    colours where the region supports the positive label, blue where it argues against it.

    Computed in blocks of :data:`OVERLAY_ROWS` rows (every step is per pixel once the scale is
    known, so the result is the same): the float64 intermediates of a whole 224x224 image
    are about 6 MB at once, which the DICOM node's 80 MB budget has no room for."""
    scale = colour_scale(sensitivity)
    out = np.empty(pixels.shape[:2] + (3,), np.uint8)
    for start in range(0, out.shape[0], OVERLAY_ROWS):
        rows = slice(start, start + OVERLAY_ROWS)
        grey = pixels[rows, :, 0].astype(np.float64)
        evidence = strength(sensitivity[rows], scale)
        alpha = (opacity * np.abs(evidence))[..., None]
        blended = np.repeat(grey[..., None], 3, axis=2) * (1.0 - alpha) + colours(evidence) * alpha
        out[rows] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
