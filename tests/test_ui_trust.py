"""The page shows the uncertain band, calibration, the site report and a legible heatmap."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")

from device.core.classifier import Classifier  # noqa: E402
from tests.test_sitecheck import accepted_profile  # noqa: E402
from tests.test_ui import fresh_process_caches as fresh_process_caches  # noqa: E402,F401  (fixture)
from tests.test_ui import logged_in_page, page_text  # noqa: E402
from tests.test_ui import settings as settings  # noqa: E402,F401  (fixture)
from tests.trustdata import ambiguous_png, copy_bundle  # noqa: E402


def html_of(page) -> str:
    return "\\n".join(str(element.proto.body) for element in page.get("html"))


def test_page_labels_a_slice_in_the_band_uncertain_with_the_band_on_the_bar(settings, monkeypatch, tiny_bundle, tmp_path):
    import dataclasses

    bundle = copy_bundle(tiny_bundle, tmp_path / "models" / "tiny", uncertain_band=[0.2, 0.8])
    data, _ = ambiguous_png(Classifier(tiny_bundle))
    settings = dataclasses.replace(settings, watch=dataclasses.replace(settings.watch, model=bundle),
                                   ui=dataclasses.replace(settings.ui, models_dir=bundle.parent))
    page = logged_in_page(settings, monkeypatch)
    page.file_uploader[0].upload("ambiguous.png", data, "image/png").run()
    assert not page.exception, page.exception
    assert "uncertain — review" in page_text(page)
    body = html_of(page)
    assert 'data-band="0.200,0.800"' in body and 'data-legend="heatmap"' in body


def test_page_shows_the_site_profile_and_its_report(settings, monkeypatch, tiny_bundle, tmp_path_factory):
    from tests.synthetic import write_image_folder

    site = write_image_folder(tmp_path_factory.mktemp("site"), per_class=30, seed=6)
    accepted_profile(tiny_bundle, site, settings.watch.state, 0.31)
    page = logged_in_page(settings, monkeypatch)
    text = page_text(page)
    assert "site threshold 0.310, checked on 60 local slices on" in text
    body = html_of(page)
    assert 'data-table="site"' in body and "ROC on local slices" in body
    assert "site calibration fitted on 60 local slices on" in text and "Reliability on local slices" in body


def test_page_refuses_a_site_profile_for_another_model(settings, monkeypatch, tiny_bundle, tmp_path_factory):
    import json

    from tests.synthetic import write_image_folder

    site = write_image_folder(tmp_path_factory.mktemp("site2"), per_class=30, seed=6)
    path = accepted_profile(tiny_bundle, site, settings.watch.state, 0.31)
    profile = json.loads(path.read_text())
    profile["model"]["sha256"] = "0" * 64
    path.write_text(json.dumps(profile))
    page = logged_in_page(settings, monkeypatch)
    assert "not for this model" in page_text(page) and "site threshold 0.310" not in page_text(page)


def test_page_model_card_shows_calibration_per_source(settings, monkeypatch, tiny_bundle, synthetic_data, tmp_path):
    import dataclasses

    from convert.calibrate import calibrate_bundle

    bundle = copy_bundle(tiny_bundle, tmp_path / "models" / "tiny")
    calibrate_bundle(bundle, [synthetic_data], show_progress=False)
    settings = dataclasses.replace(settings, watch=dataclasses.replace(settings.watch, model=bundle),
                                   ui=dataclasses.replace(settings.ui, models_dir=bundle.parent))
    page = logged_in_page(settings, monkeypatch)
    body = html_of(page)
    assert 'data-table="calibration"' in body and "Reliability after calibration" in body
    assert "ECE before" in body and "ECE if perfectly calibrated" in body


def test_page_model_card_says_when_no_calibration_map_was_applied(settings, monkeypatch, tiny_bundle, synthetic_data, tmp_path):
    """``convert.calibrate``'s auto rule may keep no map (``identity``): the bundle still loads,
    P is the model's own, and the page says why instead of printing a formula."""
    import dataclasses
    import json

    from convert.calibrate import calibrate_bundle
    from device.core.bundle import load_bundle, write_manifest

    bundle = copy_bundle(tiny_bundle, tmp_path / "models" / "tiny")
    calibrate_bundle(bundle, [synthetic_data], show_progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["calibration"].update(method="identity", a=1.0, b=0.0)
    manifest["threshold"] = manifest["calibration"]["raw_threshold"]
    write_manifest(bundle, manifest)
    loaded = load_bundle(bundle)
    raw = Classifier(tiny_bundle).predict(next(synthetic_data.rglob("*.png"))).positive_probability
    assert Classifier(loaded).predict(next(synthetic_data.rglob("*.png"))).positive_probability == pytest.approx(raw)
    settings = dataclasses.replace(settings, watch=dataclasses.replace(settings.watch, model=bundle),
                                   ui=dataclasses.replace(settings.ui, models_dir=bundle.parent))
    page = logged_in_page(settings, monkeypatch)
    text = page_text(page)
    assert "is the model's own" in text and "sigmoid(" not in text
