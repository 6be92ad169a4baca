"""Occlusion sensitivity: which regions of a slice move the model's positive probability.

The Pi runs a TFLite model with no gradients, so the heatmap is model-agnostic (Zeiler and
Fergus 2014): the preprocessed slice is cut into a coarse ``grid x grid`` of patches, each
copy has one patch replaced by the slice's mean grey, the whole batch goes through the same
:class:`~device.classifier.Classifier` that made the prediction, and a patch's value is how
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
# A map whose largest change is below this is drawn faint rather than stretched to full
# colour: a 0.01 wiggle in probability is noise, not an explanation.
COLOUR_FLOOR = 0.05
POSITIVE_RGB = np.array([230.0, 40.0, 40.0])  # hiding the region lowers P(positive)
NEGATIVE_RGB = np.array([40.0, 110.0, 230.0])  # hiding the region raises P(positive)


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


def occluded_copies(pixels: np.ndarray, grid: int) -> np.ndarray:
    """``grid**2`` copies of an ``H x W x C`` uint8 slice, copy ``i * grid + j`` with patch
    (row i, column j) filled with the slice's mean grey."""
    height, width = pixels.shape[:2]
    if grid < 1 or grid > min(height, width):
        raise ValueError(f"heatmap grid {grid} does not fit a {height}x{width} input (use 1..{min(height, width)})")
    fill = np.rint(pixels.reshape(-1, pixels.shape[-1]).mean(axis=0)).astype(pixels.dtype)
    rows, columns = patch_edges(height, grid), patch_edges(width, grid)
    batch = np.repeat(pixels[None, ...], grid * grid, axis=0)
    for i in range(grid):
        for j in range(grid):
            batch[i * grid + j, rows[i] : rows[i + 1], columns[j] : columns[j + 1]] = fill
    return batch


def occlusion_map(classifier, pixels: np.ndarray, grid: int = DEFAULT_GRID) -> Heatmap:
    """Occlusion sensitivity of ``classifier``'s positive probability for one preprocessed
    slice (the ``H x W x C`` uint8 array the model takes)."""
    start = time.perf_counter()
    positive = classifier.bundle.positive_index
    base = float(classifier.probabilities(pixels)[positive])
    occluded = classifier.probabilities_batch(occluded_copies(pixels, grid))[:, positive]
    coarse = (base - occluded).reshape(grid, grid).astype(np.float32)
    height, width = pixels.shape[:2]
    smooth = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return Heatmap(
        sensitivity=np.asarray(smooth, dtype=np.float32),
        coarse=coarse,
        base_probability=base,
        invokes=grid * grid + 1,
        seconds=time.perf_counter() - start,
    )


def overlay(pixels: np.ndarray, sensitivity: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """The slice in grey with the map blended on top (red: supports the positive label, blue:
    argues against it), as ``H x W x 3`` uint8 ready for display."""
    grey = pixels[..., 0].astype(np.float32)
    scale = max(float(np.abs(sensitivity).max()), COLOUR_FLOOR)
    strength = np.clip(sensitivity / scale, -1.0, 1.0)
    alpha = (opacity * np.abs(strength))[..., None]
    colour = np.where(strength[..., None] >= 0, POSITIVE_RGB, NEGATIVE_RGB)
    blended = np.repeat(grey[..., None], 3, axis=2) * (1.0 - alpha) + colour * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
