"""Tests whose expectations do not come from the code under test: numbers and lists written out
here, from the DICOM standard's lung window, the README's manifest contract and the gate's
documented thresholds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from device.bundle import BundleError, find_bundles, load_bundle, write_manifest

REPO = Path(__file__).resolve().parents[1]

# README "Model bundle": labels, positive label, threshold, input spec and quantization per
# format, preprocessing id, metrics, training-data fingerprint, sha256 of every file; plus the
# bundle's own name/version/architecture/creation, its formats and the seal. Written out here,
# not imported from device.bundle.REQUIRED_KEYS, so dropping a key there fails this test.
DOCUMENTED_KEYS = ("schema", "name", "version", "architecture", "created", "labels", "positive_label", "threshold",
                   "preprocessing", "input", "formats", "default_format", "files", "metrics", "training_data",
                   "bundle_sha256")
DOCUMENTED_FORMAT_KEYS = ("file", "runtime", "input", "output")


def ct_dicom(hounsfield: np.ndarray) -> bytes:
    """A CT Image Storage dataset holding ``hounsfield`` (signed stored = HU + 1024, slope 1, intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    dataset.Rows, dataset.Columns = hounsfield.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1  # signed
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = (hounsfield + 1024).astype("<i2").tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_lung_window_at_known_hounsfield_units():
    """Lung window level -600, width 1500: -1350 HU and below black, -600 HU mid-grey, +150 HU and
    above white (the window's edges and centre, worked out by hand)."""
    from device.dicom import decode

    known = {-2000: 0.0, -1350: 0.0, -975: 63.75, -600: 127.5, 150: 255.0, 1000: 255.0}
    image = np.full((64, 64), -1000, dtype=np.int32)
    for column, hu in enumerate(known):
        image[:, column * 8 : column * 8 + 8] = hu
    pixels, _mode = decode(ct_dicom(image))
    for column, expected in enumerate(known.values()):
        assert pixels[:, column * 8 : column * 8 + 8] == pytest.approx(expected, abs=0.5), list(known)[column]


@pytest.mark.parametrize("bundle", find_bundles(REPO / "models"), ids=lambda p: p.name)
def test_shipped_manifests_hold_every_documented_key(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [key for key in DOCUMENTED_KEYS if key not in manifest] == []
    for fmt, info in manifest["formats"].items():
        assert [key for key in DOCUMENTED_FORMAT_KEYS if key not in info] == [], fmt
    load_bundle(bundle)


@pytest.mark.parametrize("key", [k for k in DOCUMENTED_KEYS if k not in ("files", "bundle_sha256", "schema", "created")])
def test_a_bundle_without_a_documented_key_is_refused(tiny_bundle, tmp_path, key):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest[key]
    with pytest.raises(BundleError, match=key):
        write_manifest(copy, manifest)  # the bundle tools refuse to write it, so no loader ever sees it


def figures(agreement: float, auc: float) -> dict:
    return {"val": {"agreement": agreement, "auc": auc}}


KERAS = figures(1.0, 0.900)


@pytest.mark.parametrize(
    "fmt, agreement, auc, passes",
    [
        ("int8", 0.985, 0.905, True),     # within 0.98 agreement and 0.01 AUC
        ("int8", 0.975, 0.900, False),    # agreement below 98 %
        ("int8", 1.000, 0.885, False),    # AUC 0.015 away
        ("float16", 0.985, 0.892, True),  # float16 is a quantization too: same allowance as int8
        ("float32", 0.995, 0.9015, True),  # float32: 99 % and 0.002 AUC
        ("float32", 0.985, 0.900, False),  # what int8 may do, float32 may not
        ("float32", 1.000, 0.9035, False),
        ("onnx", 0.995, 0.8985, True),
        ("onnx", 1.000, 0.8965, False),
    ],
)
def test_accuracy_gate_agreement_and_auc_rules(fmt, agreement, auc, passes):
    pytest.importorskip("tensorflow")  # convert/ is the desktop side
    from convert.gate import check

    reasons = check(figures(agreement, auc), KERAS, fmt)
    assert (reasons == []) is passes, reasons
    if not passes:
        assert all(reason.startswith(f"{fmt}:") for reason in reasons)


def test_in_ci_a_missing_package_fails_the_run_instead_of_skipping(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n"
        "def test_needs_a_package():\n    pytest.importorskip('a_package_that_failed_to_install')\n\n"
        "@pytest.mark.system\ndef test_needs_a_service():\n    pytest.skip('sshd absent')\n"
    )

    def run(ci: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               str(tmp_path / "test_probe.py")], cwd=REPO, env=env, capture_output=True, text=True)
        return done.stdout.strip().splitlines()[-1]

    assert "2 skipped" in run("") and "failed" not in run("")
    assert "1 failed, 1 skipped" in run("true")  # the package skip fails; a missing system service may skip
