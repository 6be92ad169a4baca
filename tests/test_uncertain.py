"""The "uncertain — review" band: in predict, the journal, ctpi results and study verdicts."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from device.core.band import REVIEW, UNCERTAIN
from device.core.classifier import Classifier
from device.core.studies import aggregate
from device.watch.journal import Journal, SliceResult
from device.watch.journal_schema import SCHEMA_VERSION
from tests.synthetic import NEGATIVE, POSITIVE
from tests.trustdata import ambiguous_png, copy_bundle
from tests.watchtools import REPO, slice_png

BAND = [0.2, 0.8]


@pytest.fixture(scope="module")
def banded(tmp_path_factory, tiny_bundle):
    """The tiny bundle with a band around its threshold 0.5, and a slice that falls in it."""
    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("banded") / "tiny", uncertain_band=BAND)
    data, probability = ambiguous_png(Classifier(tiny_bundle))
    assert BAND[0] <= probability < BAND[1]
    return bundle, data


def ctpi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_slice_in_the_band_is_uncertain_and_others_keep_their_label(banded):
    bundle, ambiguous = banded
    classifier = Classifier(bundle)
    assert classifier.predict(ambiguous).label == UNCERTAIN
    assert classifier.predict(slice_png(POSITIVE, 1)).label == POSITIVE
    assert classifier.predict(slice_png(NEGATIVE, 1)).label == NEGATIVE
    assert classifier.predict(ambiguous).uncertain_band == BAND
    unbanded = Classifier(copy_bundle(bundle, bundle.parent / "plain", uncertain_band=None))
    assert unbanded.predict(ambiguous).label in (POSITIVE, NEGATIVE)


def test_predict_prints_uncertain_review_and_json_keeps_a_machine_label(banded, tmp_path):
    bundle, ambiguous = banded
    (tmp_path / "a.png").write_bytes(ambiguous)
    (tmp_path / "n.png").write_bytes(slice_png(NEGATIVE, 2))
    text = ctpi("predict", "--model", str(bundle), str(tmp_path / "a.png"), str(tmp_path / "n.png"))
    assert text.returncode == 0, text.stderr
    assert "uncertain — review" in text.stdout and "uncertain band [0.200, 0.800)" in text.stdout
    machine = json.loads(ctpi("predict", "--json", "--model", str(bundle), str(tmp_path / "a.png")).stdout)
    assert machine["results"][0]["label"] == "uncertain" and machine["results"][0]["uncertain_band"] == BAND


def test_study_with_an_uncertain_slice_and_no_positive_is_review():
    assert aggregate([0.1, 0.4], 0.5, "COVID", "NonCOVID", uncertain=[False, True]).label == REVIEW
    assert aggregate([0.1, 0.45, 0.9], 0.5, "COVID", "NonCOVID", uncertain=[False, True, False]).label == "COVID"
    assert aggregate([0.1, 0.2], 0.5, "COVID", "NonCOVID", uncertain=[False, False]).label == "NonCOVID"
    # an uncertain slice above the threshold is not a positive one
    verdict = aggregate([0.1, 0.6], 0.5, "COVID", "NonCOVID", uncertain=[False, True])
    assert verdict.label == REVIEW and verdict.positive_slices == 0 and verdict.uncertain_slices == 1


def result(path: str, probability: float, label: str) -> SliceResult:
    return SliceResult(path=path, sha256=path * 4, size=1, status="ok", seen_at=1.0, label=label, positive=label == "COVID",
                       positive_probability=probability, probabilities={"COVID": probability, "NonCOVID": 1 - probability},
                       threshold=0.5, model_name="m", model_sha256="f" * 64, uncertain_band=BAND)


def test_journal_records_uncertain_slices_and_review_studies(tmp_path):
    with Journal.open(tmp_path) as journal:
        journal.record([result("s/a.png", 0.1, "NonCOVID"), result("s/b.png", 0.55, UNCERTAIN)], "COVID", "NonCOVID")
        study = journal.study("s")
        assert study["label"] == REVIEW and study["uncertain_slices"] == 1 and study["positive"] is False
        assert journal.query_slices(label=UNCERTAIN)[0]["uncertain_band"] == BAND
        counts = journal.counts()
        assert counts["uncertain"] == 1 and counts["review_studies"] == 1
        journal.record([result("s/c.png", 0.95, "COVID")], "COVID", "NonCOVID")
        assert journal.study("s")["label"] == "COVID"


def test_a_schema_2_journal_is_migrated_to_record_bands(tmp_path):
    with Journal.open(tmp_path) as journal:
        journal.record([result("s/a.png", 0.1, "NonCOVID")], "COVID", "NonCOVID")
    db = sqlite3.connect(tmp_path / "journal.sqlite")  # turn it back into a schema-2 journal
    db.executescript("ALTER TABLE slices DROP COLUMN uncertain_band; ALTER TABLE studies DROP COLUMN uncertain_slices; PRAGMA user_version=2;")
    db.close()
    with Journal.open_readonly(tmp_path) as reader:  # readers cope before the daemon migrates it
        assert reader.query_slices()[0]["uncertain_band"] is None
    with Journal.open(tmp_path) as journal:
        # migrated to the current schema (3 added the bands; 4, bundle identity, came later)
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 3
        journal.record([result("s/b.png", 0.5, UNCERTAIN)], "COVID", "NonCOVID")
        assert journal.study("s")["label"] == REVIEW and len(journal.query_slices()) == 2


def test_daemon_records_uncertain_slices_and_results_show_the_review_study(banded, tmp_path):
    bundle, ambiguous = banded
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    (inbox / "study1").mkdir(parents=True)
    (inbox / "study1" / "a.png").write_bytes(ambiguous)
    (inbox / "study1" / "b.png").write_bytes(slice_png(NEGATIVE, 3))
    run = ctpi("watch", "--inbox", str(inbox), "--state", str(state), "--model", str(bundle), "--once", "--settle-seconds", "0.2", "--threads", "1")
    assert run.returncode == 0, run.stderr
    exported = json.loads(ctpi("results", "--state", str(state), "--json").stdout)
    assert sorted(s["label"] for s in exported["slices"]) == [NEGATIVE, UNCERTAIN]
    assert exported["studies"][0]["label"] == REVIEW and exported["studies"][0]["uncertain_slices"] == 1
    table = ctpi("results", "--state", str(state)).stdout
    assert "uncertain — review" in table and "review" in table.splitlines()[1]
