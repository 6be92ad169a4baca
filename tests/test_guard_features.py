"""The guard's features and decisions stay what they were when the shipped guards were fitted.

``guard.json`` in every bundle is fitted on :func:`device.core.guard.features`; the guard is
made faster now and then (it runs on the Pi for every slice), and a speed-up that moved a
feature would silently move every Gaussian's distances. ``guard_features_v3.json`` holds the
feature vectors (features v3) and the shipped guards' verdicts on a fixed set of synthetic
images, computed by the implementation before the speed-up of issue #13 (commit a5d8db4),
so these tests compare against numbers the current code did not produce. Rewrite the file
(``python -m tests.test_guard_features``) only with a new FEATURE_VERSION and refitted guards;
after a refit alone (same features), ``python -m tests.test_guard_features --verdicts`` takes the
new guards' verdicts and sha256 and keeps the recorded features.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.core.bundle import load_bundle
from device.core.dicom import LUNG_WINDOW
from device.core.guard import FEATURE_NAMES, FEATURE_VERSION, GUARD_FILE, features, is_flat, load_guard
from device.core.preprocess import decode_slice
from tests.synthetic import png_bytes
from tests.test_guard import SHIPPED, SIZES, ct_like, framed_phantom, not_ct_files

GOLDEN = Path(__file__).with_name("guard_features_v3.json")
SOFT_TISSUE_WINDOW = (40.0, 400.0)


def golden_images() -> dict[str, bytes]:
    """PNGs only (a JPEG decoder may round differently elsewhere): CT-like slices of several
    sizes (thumbnail factor 1 to 8, partial blocks), scanner-framed phantoms with and without a
    table in two windows (the full-image and the thumbnail view), and the not-CT files."""
    images = {}
    for index, size in enumerate([*SIZES, (509, 383), (700, 1000), (40, 30), (1024, 1024)]):
        images[f"ct-like-{size[0]}x{size[1]}"] = ct_like(("COVID", "NonCOVID")[index % 2], 40 + index, size)
    for scale in (0.3, 0.45, 0.65, 0.8):
        for table in (False, True):
            images[f"framed-{scale}-{'table' if table else 'bare'}"] = framed_phantom(scale, table)
            images[f"framed-{scale}-{'table' if table else 'bare'}-soft"] = framed_phantom(
                scale, table, wall=0.4, window=SOFT_TISSUE_WINDOW
            )
    images["framed-lung-seed9"] = framed_phantom(0.55, True, window=LUNG_WINDOW, seed=9)
    for name, data in not_ct_files().items():
        if name.endswith(".jpg"):  # the same photo as a PNG
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buffer, format="PNG")
            data = buffer.getvalue()
            name = name.removesuffix(".jpg") + ".png"
        images[name] = data
    rng = np.random.default_rng(11)
    images["noise-rgb.png"] = png_bytes(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    images["near-flat.png"] = png_bytes(np.where(rng.random((256, 256)) < 0.001, 121, 120).astype(np.uint8))
    return images


def _guard_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / GUARD_FILE).read_bytes()).hexdigest()


def compute(images: dict[str, bytes], feature_fn=features, guards: dict | None = None) -> dict:
    """Features of every image and, per shipped bundle, the guard's verdict (check name)."""
    guards = guards if guards is not None else {b.name: load_guard(load_bundle(b)) for b in SHIPPED}
    out = {"feature_version": FEATURE_VERSION, "features": list(FEATURE_NAMES), "images": {}, "guards": {}}
    for name, data in images.items():
        decoded = decode_slice(data)
        out["images"][name] = {
            "features": feature_fn(decoded).tolist(),
            "verdicts": {bundle: guard.check(decoded).check for bundle, guard in guards.items()},
        }
    out["guards"] = {b.name: _guard_sha256(b) for b in SHIPPED}
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    data = json.loads(GOLDEN.read_text())
    assert data["feature_version"] == FEATURE_VERSION and data["features"] == list(FEATURE_NAMES)
    return data


def test_features_equal_those_the_guards_were_fitted_with(golden):
    images = golden_images()
    assert set(images) == set(golden["images"])
    for name, data in images.items():
        values = features(decode_slice(data))
        expected = np.asarray(golden["images"][name]["features"])
        # float rounding only: one pixel more or less in any count moves a share by > 1e-4
        mismatched = [
            f for f, a, b in zip(FEATURE_NAMES, values, expected, strict=True) if abs(a - b) > 1e-7 * max(1.0, abs(b))
        ]
        assert not mismatched, (
            name,
            {f: (values[FEATURE_NAMES.index(f)], expected[FEATURE_NAMES.index(f)]) for f in mismatched},
        )


@pytest.mark.parametrize("bundle", SHIPPED, ids=[b.name for b in SHIPPED])
def test_shipped_guards_decide_as_before(golden, bundle):
    if golden["guards"].get(bundle.name) != _guard_sha256(bundle):
        pytest.skip(f"{bundle.name}'s guard was refitted since the golden verdicts were taken")
    guard = load_guard(load_bundle(bundle))
    images = golden_images()
    verdicts = {name: guard.check(decode_slice(data)).check for name, data in images.items()}
    expected = {name: item["verdicts"][bundle.name] for name, item in golden["images"].items()}
    assert verdicts == expected
    assert {"ct", "atypical", "flat", "colour", "noise", "no-lungs"} & set(expected.values()) >= {
        "ct",
        "flat",
        "colour",
    }


def test_flat_rule_looks_past_its_sample():
    """The flat rule settles structured images on a sparse sample; one that is flat there must
    still be judged on every pixel."""
    flat = np.full((300, 400), 87.0, dtype=np.float32)
    assert is_flat(flat)
    off_grid = flat.copy()
    off_grid[5, 7] += 0.5  # not on the every-16th-pixel sample
    assert not is_flat(off_grid)
    barely = flat.copy()
    barely[5, 7] += 0.0005
    assert is_flat(barely)
    on_grid = flat.copy()
    on_grid[16, 32] -= 2.0
    assert not is_flat(on_grid)


if __name__ == "__main__":  # pragma: no cover - rewrites the golden file (see the module docstring)
    fresh = compute(golden_images())
    if "--verdicts" in sys.argv[1:]:  # refitted guards, the same features: keep the recorded vectors
        recorded = json.loads(GOLDEN.read_text())
        for name, item in recorded["images"].items():
            item["verdicts"] = fresh["images"][name]["verdicts"]
        fresh = {**recorded, "guards": fresh["guards"]}
    GOLDEN.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
