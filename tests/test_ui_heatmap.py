"""Occlusion heatmaps computed with the real TFLite model (no gradients on the Pi)."""

from __future__ import annotations

import numpy as np
import pytest

from device.core.classifier import Classifier
from device.core.heatmap import occluded_copies, occlusion_map, overlay


def half_textured(height: int, width: int, contrast: float, seed: int = 0) -> np.ndarray:
    """Speckle of +-``contrast`` grey levels in the left half only, flat grey on the right."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width), 90.0)
    pixels[:, : width // 2] += np.where(rng.uniform(size=(height, width // 2)) > 0.5, contrast, -contrast)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., None]


def undecided_slice(classifier: Classifier) -> np.ndarray:
    """A half-textured slice whose speckle contrast puts the model near its threshold (found
    by bisection): there, hiding the deciding region must move the probability, whereas a
    saturated slice (P = 0.996) barely moves whatever is hidden."""
    spec, positive = classifier.bundle.spec, classifier.bundle.positive_index
    probability = lambda contrast: classifier.probabilities(half_textured(spec.height, spec.width, contrast))[positive]  # noqa: E731
    low, high = 1.0, 80.0
    assert (probability(low) > 0.5) != (probability(high) > 0.5), "texture does not decide this model"
    for _ in range(16):
        middle = (low + high) / 2
        if (probability(middle) > 0.5) == (probability(low) > 0.5):
            low = middle
        else:
            high = middle
    return half_textured(spec.height, spec.width, low)


def test_occluded_copies_hide_one_patch_each():
    pixels = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1)
    copies = occluded_copies(pixels, grid=2)
    fill = np.rint(pixels.mean())
    assert copies.shape == (4, 8, 8, 1)
    for index, (rows, columns) in enumerate([(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]):
        changed = copies[index] != pixels
        assert (copies[index][rows, columns] == fill).all()
        outside = np.ones((8, 8, 1), bool)
        outside[rows, columns] = False
        assert not changed[outside].any()
    with pytest.raises(ValueError, match="grid"):
        occluded_copies(pixels, grid=9)


def test_heatmap_points_at_the_region_that_drives_the_prediction(tiny_bundle):
    classifier = Classifier(tiny_bundle)
    spec = classifier.bundle.spec
    pixels = undecided_slice(classifier)
    heatmap = occlusion_map(classifier, pixels, grid=4)
    assert heatmap.invokes == 17
    assert heatmap.sensitivity.shape == (spec.height, spec.width)
    assert heatmap.base_probability == pytest.approx(float(classifier.probabilities(pixels)[classifier.bundle.positive_index]))
    textured, flat = np.abs(heatmap.coarse[:, :2]), np.abs(heatmap.coarse[:, 2:])
    assert textured.min() > 0.05  # hiding any speckle patch moves the probability
    assert textured.mean() > 3 * flat.mean()  # hiding flat grey barely does
    mirrored = occlusion_map(classifier, pixels[:, ::-1].copy(), grid=4)
    assert np.abs(mirrored.coarse[:, 2:]).mean() > 3 * np.abs(mirrored.coarse[:, :2]).mean()


def test_overlay_colours_by_sign_and_keeps_quiet_regions_grey():
    pixels = np.full((4, 6, 1), 100, np.uint8)
    sensitivity = np.zeros((4, 6), np.float32)
    sensitivity[:, :2] = 0.3  # supports the positive label: red
    sensitivity[:, 4:] = -0.3  # argues against it: blue
    image = overlay(pixels, sensitivity)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    red, grey, blue = image[0, 0], image[0, 3], image[0, 5]
    assert red[0] > red[2] and blue[2] > blue[0]
    assert (grey == 100).all()
    faint = overlay(pixels, np.full((4, 6), 0.005, np.float32))  # noise-level maps stay faint
    assert np.abs(faint.astype(int) - 100).max() < 10
