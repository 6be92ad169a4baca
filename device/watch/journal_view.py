"""The journal's read API (:class:`JournalView`): what ``ctpi results``, ``ctpi status``, the
page's history and the DICOM node read. It never writes; :class:`device.watch.journal.Journal`
adds the daemon's writes to it."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def to_timestamp(value: datetime | float | int | str | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


class JournalView:
    """One connection to the journal, read through the read API (see :mod:`device.watch.journal`)."""

    def __init__(self, connection: sqlite3.Connection, path: Path, readonly: bool):
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self.path = path
        self.readonly = readonly

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JournalView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _slice(row: sqlite3.Row) -> dict:
        record = dict(row)
        for key in ("probabilities", "latency_ms", "uncertain_band"):
            record[key] = json.loads(record[key]) if record.get(key) else None
        record["positive"] = None if record["positive"] is None else bool(record["positive"])
        for key in ("seen_at", "recorded_at", "moved_at", "pruned_at"):
            record[key] = iso(record.get(key))
        return record

    def query_slices(
        self,
        since: datetime | float | str | None = None,
        label: str | None = None,
        study: str | None = None,
        status: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[dict]:
        """Slice records, newest first, filtered by record time, label, study and status."""
        clauses, values = [], []
        if since is not None:
            clauses.append("recorded_at >= ?")
            values.append(to_timestamp(since))
        for column, value in (("label", label), ("study", study), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        values += [-1 if limit is None else int(limit), int(offset)]
        rows = self._db.execute(f"SELECT * FROM slices {where} ORDER BY id DESC LIMIT ? OFFSET ?", values)
        return [self._slice(row) for row in rows]

    @staticmethod
    def _study(row: sqlite3.Row) -> dict:
        record = dict(row)
        record["positive"] = None if record["positive"] is None else bool(record["positive"])
        for key in ("first_at", "updated_at"):
            record[key] = iso(record[key])
        return record

    def studies(self) -> list[dict]:
        """Study verdicts, most recently updated first."""
        return [self._study(row) for row in self._db.execute("SELECT * FROM studies ORDER BY updated_at DESC, name")]

    def study(self, name: str) -> dict | None:
        row = self._db.execute("SELECT * FROM studies WHERE name = ?", (name,)).fetchone()
        return self._study(row) if row else None

    def counts(self) -> dict:
        row = self._db.execute(
            "SELECT count(*) AS slices, coalesce(sum(status = 'ok'), 0) AS ok, coalesce(sum(status = 'rejected'), 0) AS rejected,"
            " coalesce(sum(positive = 1), 0) AS positive, coalesce(sum(label = 'uncertain'), 0) AS uncertain,"
            " coalesce(sum(moved_at IS NULL), 0) AS awaiting_move FROM slices"
        ).fetchone()
        counts = dict(row)
        columns = {info[1] for info in self._db.execute("PRAGMA table_info(slices)")}
        counts["pruned"] = (
            self._db.execute("SELECT count(*) FROM slices WHERE pruned_at IS NOT NULL").fetchone()[0] if "pruned_at" in columns else 0
        )  # a reader may open a journal the daemon has not migrated yet
        studies = self._db.execute(
            "SELECT count(*) AS studies, coalesce(sum(positive = 1), 0) AS positive_studies,"
            " coalesce(sum(label = 'review'), 0) AS review_studies FROM studies"
        ).fetchone()
        counts.update(dict(studies))
        counts["rejected_by_reason"] = {
            row["reason"]: row["n"]
            for row in self._db.execute("SELECT reason, count(*) AS n FROM slices WHERE status = 'rejected' GROUP BY reason ORDER BY n DESC")
        }
        return counts

    def heatmap(self, slice_id: int) -> dict | None:
        """The watch daemon's occlusion map of a study's top slice (:mod:`device.watch.evidence`):
        ``grid``, ``coarse`` (``grid x grid`` float32, None when it could not be made),
        ``base_probability``, ``model_sha256``, ``error`` (why there is none), ``made_at``; None
        while it has not been made (or the daemon has not migrated this journal yet)."""
        try:
            row = self._db.execute("SELECT * FROM heatmaps WHERE slice_id = ?", (slice_id,)).fetchone()
        except sqlite3.OperationalError:  # no such table: a journal of schema 4 or older
            return None
        if row is None:
            return None
        record = dict(row)
        if record["coarse"] is not None:
            import numpy as np

            record["coarse"] = np.frombuffer(record["coarse"], dtype="<f4").reshape(record["grid"], record["grid"]).astype(np.float32)
        record["made_at"] = iso(record["made_at"])
        return record

    def heartbeat(self) -> dict | None:
        """The daemon's last heartbeat (its JSON fields plus ``beat_at`` and ``age_seconds``)."""
        row = self._db.execute("SELECT beat_at, data FROM heartbeat WHERE id = 1").fetchone()
        if row is None:
            return None
        data = json.loads(row["data"])
        data["beat_at"] = iso(row["beat_at"])
        data["age_seconds"] = max(0.0, time.time() - row["beat_at"])
        return data
