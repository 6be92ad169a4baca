"""The journal of record: idempotent recording, moves, study verdicts, and a read API that never writes."""

from __future__ import annotations

import pytest

from device.core.studies import aggregate
from device.watch.journal import Journal, JournalError, SliceResult, stored_name
from device.watch.journal_schema import SCHEMA_VERSION


def ok(path: str, probability: float, sha: str) -> SliceResult:
    label = "COVID" if probability >= 0.5 else "NonCOVID"
    return SliceResult(path=path, sha256=sha, size=10, status="ok", seen_at=1.0, label=label, positive=label == "COVID",
                       positive_probability=probability, probabilities={"COVID": probability, "NonCOVID": 1 - probability},
                       threshold=0.5, model_name="m", model_sha256="f" * 64)


def test_recording_the_same_unmoved_drop_twice_keeps_one_record(tmp_path):
    with Journal.open(tmp_path) as journal:
        (first,) = journal.record([ok("s/a.png", 0.9, "1" * 64)], "COVID", "NonCOVID")
        (again,) = journal.record([ok("s/a.png", 0.9, "1" * 64)], "COVID", "NonCOVID")
        assert again.id == first.id and first.stored_as == stored_name(first.id, "s/a.png", "ok")
        assert [r["id"] for r in journal.unmoved()] == [first.id]
        journal.mark_moved([first.id])
        assert journal.unmoved() == []
        (later,) = journal.record([ok("s/a.png", 0.9, "1" * 64)], "COVID", "NonCOVID")  # dropped again later
        assert later.id != first.id
        assert journal.counts()["slices"] == 2


def test_a_file_that_vanished_is_recorded_as_already_moved(tmp_path):
    gone = SliceResult(path="x.png", sha256=None, size=None, status="rejected", seen_at=1.0, reason="missing", message="gone",
                        movable=False)
    with Journal.open(tmp_path) as journal:
        (record,) = journal.record([gone], "COVID", "NonCOVID")
        assert record.moved and record.stored_as is None and journal.unmoved() == []


def test_study_verdict_is_the_highest_slice_probability_against_the_threshold(tmp_path):
    with Journal.open(tmp_path) as journal:
        journal.record([ok("p/a.png", 0.2, "a" * 64), ok("p/b.png", 0.3, "b" * 64)], "COVID", "NonCOVID")
        assert journal.study("p")["label"] == "NonCOVID" and journal.study("p")["probability"] == pytest.approx(0.3)
        journal.record([ok("p/c.png", 0.7, "c" * 64), ok("top.png", 0.99, "d" * 64)], "COVID", "NonCOVID")
        study = journal.study("p")
        assert study["label"] == "COVID" and study["positive"] and study["positive_slices"] == 1 and study["slices"] == 3
        assert [s["name"] for s in journal.studies()] == ["p"]  # top-level files belong to no study
        assert journal.counts()["positive_studies"] == 1


def test_aggregate_rule_is_monotone_and_not_inflated_by_many_slices():
    assert aggregate([0.05] * 300, 0.5, "COVID", "NonCOVID").label == "NonCOVID"  # noisy-OR would say ~1.0
    flagged = aggregate([0.1, 0.8], 0.5, "COVID", "NonCOVID")
    assert flagged.label == "COVID" and flagged.top_index == 1
    assert aggregate([0.1, 0.8] + [0.01] * 50, 0.5, "COVID", "NonCOVID").label == "COVID"
    assert aggregate([], 0.5, "COVID", "NonCOVID").label is None


def test_read_api_filters_and_never_writes(tmp_path):
    with Journal.open(tmp_path) as journal:
        journal.record([ok("s1/a.png", 0.9, "a" * 64), ok("s2/b.png", 0.1, "b" * 64)], "COVID", "NonCOVID")
        journal.beat({"state": "running", "heartbeat_seconds": 5})
    with Journal.open_readonly(tmp_path) as reader:
        assert [r["path"] for r in reader.query_slices(study="s1")] == ["s1/a.png"]
        assert [r["path"] for r in reader.query_slices(label="NonCOVID")] == ["s2/b.png"]
        assert reader.query_slices(since="2999-01-01T00:00:00") == []
        assert [r["path"] for r in reader.query_slices(limit=1, offset=1)] == ["s1/a.png"]
        record = reader.query_slices(limit=1)[0]
        assert record["probabilities"]["COVID"] == pytest.approx(0.1) and record["recorded_at"].endswith("+00:00")
        assert reader.heartbeat()["state"] == "running" and reader.heartbeat()["age_seconds"] < 60
        assert reader.counts()["ok"] == 2
        with pytest.raises(JournalError):
            reader.beat({"state": "forged"})


def test_opening_a_missing_journal_read_only_says_what_to_do(tmp_path):
    with pytest.raises(JournalError, match="has `ctpi watch"):
        Journal.open_readonly(tmp_path)
    assert not (tmp_path / "journal.sqlite").exists()


def test_a_journal_of_the_first_schema_is_migrated_keeping_its_rows(tmp_path):
    import sqlite3

    with Journal.open(tmp_path) as journal:
        (record,) = journal.record([ok("s/a.png", 0.9, "1" * 64)], "COVID", "NonCOVID")
    db = sqlite3.connect(tmp_path / "journal.sqlite")  # turn it back into a schema-1 journal
    db.executescript("DROP INDEX slices_prunable; ALTER TABLE slices DROP COLUMN pruned_at; PRAGMA user_version=1;")
    db.close()
    with Journal.open_readonly(tmp_path) as reader:  # `ctpi status` before the daemon upgraded it
        assert reader.counts()["pruned"] == 0 and reader.query_slices()[0]["pruned_at"] is None
    with Journal.open(tmp_path) as journal:
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        journal.mark_moved([record.id])
        assert [r["id"] for r in journal.prunable(before=9e12)] == [record.id]
        journal.mark_pruned([record.id])
        assert journal.prunable(before=9e12) == [] and journal.counts()["pruned"] == 1
        assert journal.query_slices()[0]["label"] == "COVID"


def test_retention_lists_only_triaged_files_moved_before_the_cutoff(tmp_path):
    rejected = SliceResult(path="bad.png", sha256="2" * 64, size=3, status="rejected", seen_at=1.0, reason="empty", message="")
    with Journal.open(tmp_path) as journal:
        old, unmoved, refused = journal.record(
            [ok("s/old.png", 0.9, "1" * 64), ok("s/unmoved.png", 0.1, "3" * 64), rejected], "COVID", "NonCOVID")
        journal.mark_moved([old.id, refused.id])
        import time

        assert journal.prunable(before=time.time() - 3600) == []  # moved just now: not due
        assert [r["id"] for r in journal.prunable(before=time.time() + 1)] == [old.id]  # never unmoved or rejected


def test_a_schema_3_journal_gains_the_bundle_identity_column(tmp_path):
    import sqlite3

    with Journal.open(tmp_path) as journal:
        journal.record([ok("s/a.png", 0.9, "1" * 64)], "COVID", "NonCOVID")
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.executescript("ALTER TABLE slices RENAME COLUMN bundle_sha256 TO unused; PRAGMA user_version=3;")
    db.close()
    with Journal.open(tmp_path) as journal:
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        later = ok("s/b.png", 0.2, "2" * 64)
        later.bundle_sha256 = "b" * 64
        journal.record([later], "COVID", "NonCOVID")
        by_path = {r["path"]: r for r in journal.query_slices()}
    assert by_path["s/a.png"]["bundle_sha256"] is None and by_path["s/b.png"]["bundle_sha256"] == "b" * 64
