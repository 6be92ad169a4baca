"""Helpers for the trust tests (calibration, uncertain band, site check): a CT-like synthetic
slice the tiny model cannot call, and bundle copies with a band or calibration written
through :func:`device.core.bundle.write_manifest` (checksums stay right)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from device.core.bundle import load_bundle, write_manifest
from tests.synthetic import NEGATIVE, POSITIVE, png_bytes, slice_array


def blended_png(weight: float, seed: int = 7) -> bytes:
    """A synthetic slice between the classes: ``weight`` of a COVID slice's lung texture blended
    into a NonCOVID one (same anatomy), so it stays CT-like while its score moves."""
    positive = slice_array(POSITIVE, np.random.default_rng(seed)).astype(np.float64)
    negative = slice_array(NEGATIVE, np.random.default_rng(seed)).astype(np.float64)
    return png_bytes(np.clip(np.rint((1 - weight) * negative + weight * positive), 0, 255).astype(np.uint8))


def ambiguous_png(classifier, target: float = 0.5) -> tuple[bytes, float]:
    """A blended slice whose positive probability is close to ``target`` (by bisection on the
    blend weight), and that probability."""
    probability = lambda weight: classifier.predict(blended_png(weight)).positive_probability  # noqa: E731
    low, high = 0.0, 1.0
    assert probability(low) < target <= probability(high), "blending does not move this model across the target"
    for _ in range(20):
        middle = (low + high) / 2
        if probability(middle) < target:
            low = middle
        else:
            high = middle
    data = blended_png(low)
    return data, probability(low)


def copy_bundle(source: Path, target: Path, **changes) -> Path:
    """A copy of a bundle with manifest keys replaced (``None`` removes a key)."""
    shutil.copytree(source, target)
    manifest = dict(load_bundle(target).manifest)
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    write_manifest(target, manifest)
    load_bundle(target)
    return target
