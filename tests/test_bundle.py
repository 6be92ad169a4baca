"""Model bundles: complete manifests, verified checksums, and clear refusals."""

import json
import shutil

import pytest

from device.core.bundle import (
    MANIFEST,
    REQUIRED_KEYS,
    BundleError,
    file_sha256,
    find_bundles,
    load_bundle,
    write_manifest,
)
from device.core.classifier import Classifier


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def read_manifest(path):
    return json.loads((path / MANIFEST).read_text())


def test_bundle_manifest_is_complete_and_checksums_every_file(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    assert set(REQUIRED_KEYS) <= set(manifest)
    files = {p.name for p in tiny_bundle.iterdir() if p.name != MANIFEST}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert file_sha256(tiny_bundle / name) == digest
    int8 = bundle.format_info("int8")
    assert int8["input"]["dtype"] == "int8" and int8["input"]["quantization"]["scale"] > 0
    assert bundle.positive_label == "COVID" and bundle.labels == ["COVID", "NonCOVID"]


def test_tampered_model_file_is_refused_naming_the_file(bundle_copy):
    model = bundle_copy / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model_int8.tflite .*changed or corrupted"):
        load_bundle(bundle_copy)


def test_missing_model_file_is_refused(bundle_copy):
    (bundle_copy / "model_float32.tflite").unlink()
    with pytest.raises(BundleError, match="model_float32.tflite is listed .* but missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("key", ["threshold", "labels", "preprocessing", "files"])
def test_incomplete_manifest_is_refused_naming_the_key(bundle_copy, key):
    manifest = read_manifest(bundle_copy)
    del manifest[key]
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"missing \\[.*'{key}'"):
        load_bundle(bundle_copy)


def test_manifest_that_is_not_json_is_refused(bundle_copy):
    (bundle_copy / MANIFEST).write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a ctpi model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_manifest_cannot_point_outside_the_bundle(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["files"]["../escape.tflite"] = "0" * 64
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="escapes the bundle"):
        load_bundle(bundle_copy)


def test_positive_label_and_threshold_are_validated(bundle_copy):
    manifest = read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="threshold 1.5"):
        write_manifest(bundle_copy, manifest | {"threshold": 1.5})
    with pytest.raises(BundleError, match="positive_label 'Flu'"):
        write_manifest(bundle_copy, manifest | {"positive_label": "Flu"})


def test_model_that_disagrees_with_its_preprocessing_is_refused(bundle_copy):
    manifest = read_manifest(bundle_copy)
    manifest["preprocessing"]["height"] = 64
    write_manifest(bundle_copy, manifest)  # checksums are fine; the content is inconsistent
    with pytest.raises(BundleError, match="model input is .* but the manifest's preprocessing produces"):
        Classifier(bundle_copy)


def test_unknown_format_choice_lists_what_the_bundle_has(tiny_bundle):
    with pytest.raises(BundleError, match="no 'float64' model; it has"):
        Classifier(tiny_bundle, "float64")


def test_find_bundles_lists_folders_with_a_manifest(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "b")
    (tmp_path / "not-a-bundle").mkdir()
    assert find_bundles(tmp_path) == [tmp_path / "b"]


def test_hand_edited_manifest_is_refused_naming_it(bundle_copy, tiny_bundle):
    """The issue's scenario: threshold 0.99 typed into a copied bundle's manifest."""
    manifest = read_manifest(bundle_copy)
    manifest["threshold"] = 0.99
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(BundleError, match="manifest.json was edited after the bundle was made.*site profile"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="edited"):
        Classifier(bundle_copy)


@pytest.mark.parametrize("key, value", [("labels", ["NonCOVID", "COVID"]), ("calibration", {"a": 1.0, "b": 3.0}),
                                        ("uncertain_band", [0.0, 1.0]), ("a_field_added_next_year", 1)])
def test_any_manifest_content_is_covered_by_the_seal(bundle_copy, key, value):
    """Generic: the seal covers whatever the manifest holds, known keys or not."""
    manifest = read_manifest(bundle_copy)
    manifest[key] = value
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited"):
        load_bundle(bundle_copy)


def test_manifest_without_a_seal_is_refused(bundle_copy):
    manifest = read_manifest(bundle_copy)
    del manifest["bundle_sha256"]
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no bundle_sha256 seal"):
        load_bundle(bundle_copy)


def test_reformatting_the_manifest_keeps_its_identity(bundle_copy, tiny_bundle):
    """The seal is over content, not bytes: key order and whitespace do not matter."""
    manifest = read_manifest(bundle_copy)
    (bundle_copy / MANIFEST).write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=7))
    assert load_bundle(bundle_copy).digest == load_bundle(tiny_bundle).digest == manifest["bundle_sha256"]


def test_write_manifest_reseals_so_bundle_tools_keep_working(bundle_copy, tiny_bundle):
    """convert.guard / convert.calibrate rewrite manifests through write_manifest: a new field
    gives a new, valid identity."""
    manifest = read_manifest(bundle_copy)
    write_manifest(bundle_copy, manifest | {"note": "recalibrated"})
    reloaded = load_bundle(bundle_copy)
    assert reloaded.manifest["note"] == "recalibrated" and reloaded.digest != load_bundle(tiny_bundle).digest


def test_deploy_pin_refuses_another_bundle(bundle_copy, tiny_bundle):
    pinned = load_bundle(tiny_bundle).digest
    assert load_bundle(bundle_copy, expected_sha256=pinned).digest == pinned
    write_manifest(bundle_copy, read_manifest(bundle_copy) | {"threshold": 0.25})  # a validly sealed other bundle
    with pytest.raises(BundleError, match="not .* that this service was deployed with"):
        load_bundle(bundle_copy, expected_sha256=pinned)


def test_shipped_bundles_are_sealed():
    from pathlib import Path

    for bundle in find_bundles(Path(__file__).resolve().parents[1] / "models"):
        assert load_bundle(bundle).digest == read_manifest(bundle)["bundle_sha256"]
