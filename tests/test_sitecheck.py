"""``ctpi site-check``: figures against hand answers, the site profile, and who uses it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device.classifier import Classifier
from device.journal import Journal
from device.sitecheck import PROFILE_NAME, SiteProfileError, load_site_profile, site_check, write_site_profile
from tests.synthetic import NEGATIVE, POSITIVE, write_image_folder
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
    from device.sitecheck import profile_from_report

    data = profile_from_report(site_check(classifier, large_site, show_progress=False))
    data["model"]["sha256"] = "0" * 64
    write_site_profile(tmp_path, data)
    with pytest.raises(SiteProfileError, match="not for this model"):
        classifier.use_site_profile(load_site_profile(tmp_path))
    assert classifier.site is None


def accepted_profile(tiny_bundle, large_site, state, threshold: float):
    """A real accepted profile, with the threshold moved so the daemon's use of it shows."""
    from device.sitecheck import profile_from_report

    data = profile_from_report(site_check(Classifier(tiny_bundle), large_site, show_progress=False))
    data["threshold"], data["uncertain_band"] = threshold, [threshold - 0.01, threshold + 0.01]
    return write_site_profile(state, data)


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
