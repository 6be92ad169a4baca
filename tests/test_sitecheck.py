"""``ctpi site-check``: figures against hand answers, the site calibration map, the site profile, and who uses it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device.core.calibration import Calibration, fit, logit, sigmoid
from device.core.classifier import Classifier
from device.core.metrics import expected_calibration_error
from device.core.preprocess import decode_slice, prepare
from device.core.siteprofile import PROFILE_NAME, SiteProfileError, load_site_profile, write_site_profile
from device.tools.sitecheck import site_calibration, site_check, stratified_folds
from device.watch.journal import Journal
from tests.synthetic import NEGATIVE, POSITIVE, png_bytes, slice_array, write_image_folder
from tests.trustdata import copy_bundle
from tests.watchtools import REPO, slice_png


def ctpi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    """12 slices per class, two smooth (negative-looking) slices filed under COVID, and an
    empty file: sensitivity 12/14, specificity 12/12, one refused."""
    root = write_image_folder(tmp_path_factory.mktemp("site"), per_class=12, seed=5)
    for index in range(2):
        (root / POSITIVE / f"missed_{index}.png").write_bytes(slice_png(NEGATIVE, 100 + index))
    (root / NEGATIVE / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def large_site(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("large"), per_class=30, seed=6)


def test_site_check_figures_match_hand_answers(tiny_bundle, small_site):
    report = site_check(Classifier(tiny_bundle), small_site, show_progress=False)
    bundle = report["bundle"]
    assert bundle["confusion"] == {"tp": 12, "fn": 2, "fp": 0, "tn": 12}
    sensitivity, specificity = bundle["sensitivity"], bundle["specificity"]
    assert (sensitivity["successes"], sensitivity["n"]) == (12, 14) and sensitivity["value"] == pytest.approx(12 / 14)
    # Wilson 12/14: centre (0.857143 + 0.137202) / 1.274405 = 0.780245, half-width 1.96·sqrt(0.008746 + 0.004901) / 1.274405 = 0.179663
    assert sensitivity["ci95"] == pytest.approx([0.6006, 0.9599], abs=1e-4)
    # Wilson 12/12: centre (1 + 0.160073) / 1.320146 = 0.878748, half-width 1.96·sqrt(0.006670) / 1.320146 = 0.121252
    assert specificity["ci95"] == pytest.approx([0.7575, 1.0], abs=1e-4)
    assert report["refused"]["n"] == 1 and report["refused"]["by_reason"] == {"empty": 1}
    assert report["data"]["n"] == 26 and report["data"]["positive"] == 14
    auc = report["auc"]
    assert 24 / 28 - 1e-9 <= auc["value"] < 1.0 and auc["ci95"][0] < auc["value"] <= auc["ci95"][1]  # the two missed score low
    assert report["enough"] is False and "30" in report["warning"]
    assert 0 <= report["calibration"]["ece"] <= 1 and report["uncertain"] == 0
    floor = report["calibration"]["ece_if_calibrated"]  # on 26 slices an exactly right P still shows some ECE
    assert 0 < floor["low"] <= floor["median"] <= floor["high"] and 0 <= floor["p_value"] <= 1


def test_accept_refused_with_too_few_slices_and_written_only_when_asked(tiny_bundle, small_site, large_site, tmp_path):
    state = tmp_path / "state"
    few = ctpi("site-check", "--model", str(tiny_bundle), str(small_site), "--accept", "--state", str(state))
    assert few.returncode == 1 and "not accepted" in few.stderr and "WARNING" in few.stdout
    assert not (state / PROFILE_NAME).exists()
    looked = ctpi("site-check", "--json", "--model", str(tiny_bundle), str(large_site), "--state", str(state))
    assert looked.returncode == 0, looked.stderr
    assert json.loads(looked.stdout)["accepted"] is None and not (state / PROFILE_NAME).exists()
    accepted = ctpi("site-check", "--model", str(tiny_bundle), str(large_site), "--accept", "--state", str(state))
    assert accepted.returncode == 0, accepted.stderr
    profile = load_site_profile(state)
    assert profile.model_sha256 == Classifier(tiny_bundle).sha256 and profile.data["data"]["n"] == 60
    assert "checked on 60 local slices on" in profile.describe() and "sensitivity" in accepted.stdout


def test_a_profile_for_another_model_is_refused(tiny_bundle, large_site, tmp_path):
    classifier = Classifier(tiny_bundle)
    from device.tools.sitecheck import profile_from_report

    data = profile_from_report(site_check(classifier, large_site, show_progress=False))
    data["model"]["sha256"] = "0" * 64
    write_site_profile(tmp_path, data)
    with pytest.raises(SiteProfileError, match="not for this model"):
        classifier.use_site_profile(load_site_profile(tmp_path))
    assert classifier.site is None


def accepted_profile(tiny_bundle, large_site, state, threshold: float, calibration: tuple[float, float] | None = None):
    """A real accepted profile, with the threshold (and the site map's ``(a, b)``) moved so the
    daemon's use of it shows."""
    from device.tools.sitecheck import profile_from_report

    data = profile_from_report(site_check(Classifier(tiny_bundle), large_site, show_progress=False))
    data["threshold"], data["uncertain_band"] = threshold, [threshold - 0.01, threshold + 0.01]
    if calibration is not None:
        data["calibration"]["a"], data["calibration"]["b"] = calibration
    return write_site_profile(state, data)


def raw_positive(classifier: Classifier, data: bytes) -> float:
    """The model file's own positive output for a slice, before any calibration map."""
    pixels = prepare(decode_slice(data).pixels, classifier.bundle.spec)
    return float(classifier.raw_probabilities(pixels)[classifier.bundle.positive_index])


def shifted_scores(n: int, shift: float, seed: int):
    """Labels drawn from true probabilities, and an overconfident model whose logit is moved by
    ``shift`` (what a hospital's scanners do to it)."""
    rng = np.random.default_rng(seed)
    truth = sigmoid(rng.normal(0.0, 1.2, n))
    y = (rng.uniform(size=n) < truth).astype(int)
    return y, sigmoid(2.0 * logit(truth) + shift)


def test_site_map_cuts_the_cross_fitted_ece_well_below_the_bundle_maps_on_a_shifted_site():
    bundle_y, bundle_raw = shifted_scores(2000, shift=1.0, seed=11)  # where the bundle's map was fitted
    bundle_map = fit(bundle_raw, bundle_y)
    y, raw = shifted_scores(600, shift=-2.0, seed=12)  # the site: shifted the other way
    site_map, figures = site_calibration(y, raw, bundle_map)
    ece = figures["ece"]
    assert ece["bundle_map"] == pytest.approx(expected_calibration_error(y, bundle_map.apply(raw)))
    # measured: bundle map 0.241, site map 0.037 cross-fitted (10-bin ECE of 600 slices is ~0.03 even when exact)
    assert ece["bundle_map"] > 0.15
    assert ece["site_map_cross_fitted"] < 0.06 and ece["site_map_cross_fitted"] < ece["bundle_map"] / 4
    assert ece["site_map_in_sample"] == pytest.approx(expected_calibration_error(y, site_map.apply(raw)))
    assert site_map.a == pytest.approx(0.5, abs=0.15) and site_map.b == pytest.approx(1.0, abs=0.4)  # undoes 2·z - 2
    assert figures["cross_fit"] == {"folds": 5, "stratified": True, "seed": 0}
    assert set(figures["reliability"]) == {"model output", "bundle map", "site map, in-sample", "site map, cross-fitted"}
    folds = stratified_folds(y, 5)  # every fold holds each class in the site's proportion (within one slice)
    for fold in range(5):
        assert abs(y[folds == fold].sum() - y.sum() / 5) <= 1 and abs((1 - y[folds == fold]).sum() - (1 - y).sum() / 5) <= 1


def test_site_check_fits_the_site_map_on_raw_outputs_and_proposes_on_its_scale(tiny_bundle, large_site, tmp_path):
    # the bundle's map pushes every slice towards COVID: badly calibrated on this site
    shifted = copy_bundle(tiny_bundle, tmp_path / "shifted", calibration={"method": "platt", "a": 1.0, "b": 4.0})
    classifier = Classifier(shifted)
    report = site_check(classifier, large_site, show_progress=False)
    site = report["site_calibration"]
    assert site["ece"]["bundle_map"] == pytest.approx(report["calibration"]["ece"])
    assert site["ece"]["site_map_cross_fitted"] < site["ece"]["bundle_map"] / 2
    site_map = Calibration("platt", site["a"], site["b"])
    negative, positive = (site_map.apply(raw_positive(classifier, slice_png(label, 3))) for label in (NEGATIVE, POSITIVE))
    assert report["proposed"]["scale"] == "site-calibrated"
    assert negative < report["proposed"]["threshold"] <= positive  # on the site map's scale
    svg = tmp_path / "reliability.svg"
    state = tmp_path / "state"
    run = ctpi("site-check", "--model", str(shifted), str(large_site), "--accept", "--state", str(state), "--reliability", str(svg))
    assert run.returncode == 0, run.stderr
    assert "cross-fitted" in run.stdout and "in-sample" in run.stdout and svg.read_text().startswith("<svg")
    profile = load_site_profile(state)
    assert profile.calibration == site_map and profile.data["model"]["bundle_sha256"] == classifier.bundle_sha256
    assert f"site calibration fitted on 60 local slices on {profile.data['accepted'][:10]}: ECE " in profile.describe()
    assert "(cross-fitted)" in profile.describe()


def test_a_site_where_the_auc_interval_covers_one_half_is_not_accepted(tiny_bundle, tmp_path):
    # every folder holds as many COVID-looking as smooth slices: the labels say nothing the model sees
    rng = np.random.default_rng(21)
    for label in (POSITIVE, NEGATIVE):
        (tmp_path / "site" / label).mkdir(parents=True)
        for index in range(32):
            look = POSITIVE if index % 2 else NEGATIVE
            (tmp_path / "site" / label / f"{index:03d}.png").write_bytes(png_bytes(slice_array(look, rng)))
    state = tmp_path / "state"
    run = ctpi("site-check", "--json", "--model", str(tiny_bundle), str(tmp_path / "site"), "--accept", "--state", str(state))
    assert run.returncode == 1 and "does not lie above 0.5" in run.stderr and "must not go live" in run.stderr
    report = json.loads(run.stdout)
    assert report["enough"] is True and report["auc"]["ci95"][0] <= 0.5 <= report["auc"]["ci95"][1]
    assert report["accepted"] is None and not (state / PROFILE_NAME).exists()


def test_the_accepted_site_map_replaces_the_bundles_map_in_the_classifier_and_the_daemon(tiny_bundle, large_site, tmp_path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    accepted_profile(tiny_bundle, large_site, state, 0.5, calibration=(0.5, -3.0))
    data = slice_png(POSITIVE, 4)
    classifier = Classifier(tiny_bundle)
    raw = raw_positive(classifier, data)
    expected = float(sigmoid(0.5 * logit(raw) - 3.0))
    assert classifier.predict(data).positive_probability == pytest.approx(classifier.calibration.apply(raw), abs=1e-6)
    classifier.use_site_profile(load_site_profile(state))
    assert classifier.predict(data).positive_probability == pytest.approx(expected, abs=1e-6)
    assert abs(expected - classifier.calibration.apply(raw)) > 0.3  # the map makes a visible difference (0.996 -> 0.44)
    (inbox / "a.png").write_bytes(data)
    run = ctpi("watch", "--inbox", str(inbox), "--state", str(state), "--model", str(tiny_bundle), "--once", "--settle-seconds", "0.2")
    assert run.returncode == 0, run.stderr
    with Journal.open_readonly(state) as journal:
        (record,) = journal.query_slices()
        beat = journal.heartbeat()
    assert record["positive_probability"] == pytest.approx(expected, abs=1e-6) and record["label"] == NEGATIVE  # was COVID at 0.996
    assert "site calibration fitted on 60 local slices" in beat["model"]["site_profile"]
    assert "site calibration fitted on 60 local slices" in ctpi("status", "--state", str(state)).stdout


def test_a_schema_1_profile_keeps_the_bundles_map(tiny_bundle, large_site, tmp_path):
    path = accepted_profile(tiny_bundle, large_site, tmp_path, 0.4)
    data = json.loads(path.read_text())
    data["schema"] = "ctpi.site-profile/1"
    del data["calibration"]
    path.write_text(json.dumps(data))
    classifier = Classifier(tiny_bundle)
    classifier.use_site_profile(load_site_profile(tmp_path))
    assert classifier.site.calibration is None and classifier.calibration_in_use is classifier.calibration
    assert classifier.threshold == 0.4 and "site calibration" not in classifier.site.describe()


def test_the_daemon_decides_with_the_site_profile_and_refuses_another_models(tiny_bundle, large_site, tmp_path):
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    accepted_profile(tiny_bundle, large_site, state, 0.31)
    (inbox / "a.png").write_bytes(slice_png(POSITIVE, 1))
    run = ctpi("watch", "--inbox", str(inbox), "--state", str(state), "--model", str(tiny_bundle), "--once", "--settle-seconds", "0.2")
    assert run.returncode == 0, run.stderr
    with Journal.open_readonly(state) as journal:
        (record,) = journal.query_slices()
        beat = journal.heartbeat()
    assert record["threshold"] == 0.31 and record["uncertain_band"] == [0.3, 0.32]
    assert "site threshold 0.310" in beat["model"]["site_profile"]
    status = ctpi("status", "--state", str(state))
    assert "site threshold 0.310, checked on 60 local slices" in status.stdout
    profile = json.loads((state / PROFILE_NAME).read_text())
    profile["model"]["sha256"] = "0" * 64
    (state / PROFILE_NAME).write_text(json.dumps(profile))
    (inbox / "b.png").write_bytes(slice_png(POSITIVE, 2))
    run = ctpi("watch", "--inbox", str(inbox), "--state", str(state), "--model", str(tiny_bundle), "--once", "--settle-seconds", "0.2")
    assert run.returncode == 0 and "not for this model" in run.stderr
    with Journal.open_readonly(state) as journal:
        assert journal.query_slices()[0]["threshold"] == Classifier(tiny_bundle).bundle.threshold
        assert "not for this model" in journal.heartbeat()["model"]["site_profile_error"]
    assert "REFUSED" in ctpi("status", "--state", str(state)).stdout


def test_dicom_studies_count_in_the_site_check(tiny_bundle, tmp_path):
    pytest.importorskip("pydicom")
    from tests.dicomtools import write_series

    write_image_folder(tmp_path / "site", per_class=3, seed=8)
    write_series(tmp_path / "site" / POSITIVE / "study-a", 2, label=POSITIVE, size=128, seed=1)
    write_series(tmp_path / "site" / NEGATIVE / "study-b", 2, label=NEGATIVE, size=128, seed=2)
    report = site_check(Classifier(tiny_bundle), tmp_path / "site", show_progress=False)
    assert report["data"]["files"] == 10 and report["data"]["n"] + report["refused"]["n"] == 10
    assert report["data"]["positive"] + report["refused"]["n"] >= 5


def test_predict_with_the_state_folder_decides_with_its_site_profile_and_refuses_another_models(tiny_bundle, large_site, tmp_path):
    """``ctpi predict --state`` answers as the daemon would on that appliance: the site map and
    threshold, said in its output; a profile for another model stops it with the reason."""
    state = tmp_path / "state"
    accepted_profile(tiny_bundle, large_site, state, 0.5, calibration=(0.5, -3.0))
    slice_file = tmp_path / "a.png"
    slice_file.write_bytes(slice_png(POSITIVE, 4))
    raw = raw_positive(Classifier(tiny_bundle), slice_file.read_bytes())
    plain = json.loads(ctpi("predict", "--model", str(tiny_bundle), "--json", str(slice_file)).stdout)
    site = ctpi("predict", "--model", str(tiny_bundle), "--json", "--state", str(state), str(slice_file))
    assert site.returncode == 0, site.stderr
    site = json.loads(site.stdout)
    assert plain["site_profile"] is None and plain["results"][0]["label"] == POSITIVE
    assert site["results"][0]["positive_probability"] == pytest.approx(float(sigmoid(0.5 * logit(raw) - 3.0)), abs=1e-6)
    assert site["results"][0]["label"] == NEGATIVE and "site calibration fitted on 60 local slices" in site["site_profile"]
    assert "site threshold 0.500" in ctpi("predict", "--model", str(tiny_bundle), "--state", str(state), str(slice_file)).stdout

    profile = json.loads((state / PROFILE_NAME).read_text())
    profile["model"]["sha256"] = "0" * 64
    (state / PROFILE_NAME).write_text(json.dumps(profile))
    refused = ctpi("predict", "--model", str(tiny_bundle), "--state", str(state), str(slice_file))
    assert refused.returncode == 2 and "not for this model" in refused.stderr and refused.stdout == ""
