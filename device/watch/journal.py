"""What happened to each slice: the SQLite (WAL) journal of record in ``STATE/journal.sqlite``.

Writers: only the watch daemon (:meth:`Journal.open`). Readers (``ctpi results``,
``ctpi status``, the web UI's history page) use the read API, which never writes:

- ``Journal.open_readonly(state_dir)``
- ``query_slices(since=None, label=None, study=None, status=None, limit=100, offset=0)``
  newest first, each a dict (times as ISO 8601 UTC, probabilities as a dict);
- ``studies()`` and ``study(name)``: verdicts per study folder (see :mod:`device.core.studies`);
- ``counts()``: slices ok/rejected/positive, studies, files awaiting their move, files pruned;
- ``heartbeat()``: the daemon's last heartbeat with ``age_seconds``.

The exactly-once protocol (one record per dropped file, whatever instant the power goes):

1. a file in the inbox with no open record is **to do** (the inbox itself is the queue: a
   file whose result was never committed is simply processed again);
2. its result (ok with label and probabilities, or rejected with a reason) is **recorded**
   with the inbox path and the sha256 of the exact bytes processed, committed with
   ``synchronous=FULL`` in small groups, before the file is touched;
3. the file is **moved** to ``STATE/done/`` or ``STATE/rejected/`` (name prefixed by the
   record id) and the record is marked moved.

Before decoding, the reader **claims** the file (``claims`` table, attempts counted per
path and size/mtime/inode); recording deletes the claim. A file whose claim reaches
``max_attempts`` took the daemon down that often (a decoder crash, the memory limit): it is
rejected as ``crashed-daemon`` without being decoded again, so one poison file cannot hold
the appliance in a restart loop.

A restart finds records that are not marked moved (:meth:`Journal.unmoved`) and finishes
their moves; :meth:`Journal.record` reuses an unmoved record with the same path and sha256
instead of inserting a second one. The same content dropped again later, or under another
name, is a new drop and gets its own record.

Retention (``[watch] keep_done_days``): :meth:`Journal.prunable` lists triaged files moved
to ``done/`` before a cutoff; the daemon deletes each file, then :meth:`Journal.mark_pruned`
sets ``pruned_at``. The record (result, sha256, study verdict) is kept forever; only the
image goes. Deleting before marking makes a crash in between harmless: the next pass finds
the file already gone and marks it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from device.core.band import UNCERTAIN
from device.core.studies import RULE, aggregate

JOURNAL_NAME = "journal.sqlite"
SCHEMA_VERSION = 4  # 2: slices.pruned_at (retention); 3: slices.uncertain_band, studies.uncertain_slices;
# 4: slices.bundle_sha256

SCHEMA = """
CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,                 -- relative to the inbox, '/'-separated
    study TEXT,                         -- first folder under the inbox; NULL at the top level
    sha256 TEXT,                        -- of the bytes processed; NULL if they could not be read
    size INTEGER,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')),
    label TEXT,
    positive INTEGER,                   -- 1 if label is the bundle's positive label
    positive_probability REAL,
    probabilities TEXT,                 -- JSON {label: probability}
    threshold REAL,
    model_name TEXT,
    model_sha256 TEXT,
    reason TEXT,                        -- BadSliceError.reason for rejected files
    message TEXT,
    format TEXT,                        -- PNG, JPEG, DICOM
    mode TEXT,
    latency_ms TEXT,                    -- JSON
    seen_at REAL NOT NULL,              -- unix seconds: first noticed in the inbox
    recorded_at REAL NOT NULL,
    stored_as TEXT,                     -- relative to the state folder
    moved_at REAL,                      -- NULL until the file has left the inbox
    pruned_at REAL,                     -- when retention deleted the stored file (record kept)
    uncertain_band TEXT,                -- JSON [low, high] of P where the label is 'uncertain'; NULL: no band
    bundle_sha256 TEXT                  -- the bundle identity: manifest and files, see device.core.bundle.bundle_digest
);
CREATE INDEX IF NOT EXISTS slices_unmoved ON slices(path) WHERE moved_at IS NULL;
CREATE INDEX IF NOT EXISTS slices_study ON slices(study);
CREATE INDEX IF NOT EXISTS slices_recorded ON slices(recorded_at);
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY,
    slices INTEGER NOT NULL,            -- readable slices
    rejected INTEGER NOT NULL,
    positive_slices INTEGER NOT NULL,
    uncertain_slices INTEGER NOT NULL DEFAULT 0,  -- slices labelled 'uncertain' (verdict 'review' if no positive)
    probability REAL,
    label TEXT,
    positive INTEGER,                   -- 1 if label is the positive label
    threshold REAL,
    rule TEXT NOT NULL,
    top_slice_id INTEGER,               -- the slice that carries the verdict
    model_sha256 TEXT,
    first_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    path TEXT PRIMARY KEY,              -- a file the reader started on, not yet recorded
    signature TEXT NOT NULL,            -- size/mtime/inode: a changed file starts again at 1
    attempts INTEGER NOT NULL,
    claimed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    beat_at REAL NOT NULL,
    data TEXT NOT NULL                  -- JSON: pid, state, model, queue, memory, ...
);
"""

# Run after SCHEMA and the migrations: they name columns a journal of an older schema lacks.
INDEXES = """
CREATE INDEX IF NOT EXISTS slices_prunable ON slices(moved_at) WHERE status = 'ok' AND pruned_at IS NULL;
"""


def _migrate(connection: sqlite3.Connection, version: int) -> None:
    """Bring a journal of an older schema up to :data:`SCHEMA_VERSION`, keeping every row."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(slices)")}
    if version < 2 and "pruned_at" not in columns:
        connection.execute("ALTER TABLE slices ADD COLUMN pruned_at REAL")
    if version < 3 and "uncertain_band" not in columns:
        connection.execute("ALTER TABLE slices ADD COLUMN uncertain_band TEXT")
    if version < 4 and "bundle_sha256" not in columns:
        connection.execute("ALTER TABLE slices ADD COLUMN bundle_sha256 TEXT")
    if version < 3 and "uncertain_slices" not in {row[1] for row in connection.execute("PRAGMA table_info(studies)")}:
        connection.execute("ALTER TABLE studies ADD COLUMN uncertain_slices INTEGER NOT NULL DEFAULT 0")


def immediate(db: sqlite3.Connection, work):
    """``work(db)`` in one IMMEDIATE transaction (the write lock taken up front, so two
    writers never deadlock upgrading a read lock): committed whole or rolled back whole."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result

class JournalError(RuntimeError):
    """The journal cannot be opened or written (missing, read-only, disk full, corrupt)."""


@dataclass
class SliceResult:
    """One processed file, as the daemon hands it to :meth:`Journal.record`."""

    path: str
    sha256: str | None
    size: int | None
    status: str  # ok | rejected
    seen_at: float
    label: str | None = None
    positive: bool | None = None
    positive_probability: float | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    reason: str | None = None
    message: str | None = None
    format: str | None = None
    mode: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    uncertain_band: list[float] | None = None  # the band in force when it was scored
    bundle_sha256: str | None = None  # the bundle's identity: a changed manifest is a changed identity
    movable: bool = True  # False when there is no file left in the inbox to move

    @property
    def study(self) -> str | None:
        parts = PurePosixPath(self.path).parts
        return parts[0] if len(parts) > 1 else None


@dataclass(frozen=True)
class Recorded:
    """Where a recorded file goes: its record id and path relative to the state folder
    (None when there is no file left to move)."""

    id: int
    path: str
    stored_as: str | None
    moved: bool


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


def stored_name(record_id: int, path: str, status: str) -> str:
    """``done/<folders>/<id>-<name>``: the id keeps equal names of different drops apart."""
    relative = PurePosixPath(path)
    folder = PurePosixPath("done" if status == "ok" else "rejected", *relative.parts[:-1])
    return str(folder / f"{record_id:06d}-{relative.name}")


class Journal:
    """One connection to the journal. The daemon is the only writer."""

    def __init__(self, connection: sqlite3.Connection, path: Path, readonly: bool):
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self.path = path
        self.readonly = readonly

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | Path, synchronous: str = "FULL") -> Journal:
        """Open (creating if needed) for writing; WAL, ``synchronous=FULL`` (``NORMAL`` is
        enough for claims: they must survive a process crash, not a power cut)."""
        path = Path(state_dir) / JOURNAL_NAME
        try:
            connection = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"journal {path} has schema {version}, newer than this ctpi ({SCHEMA_VERSION}); upgrade ctpi")
            connection.executescript(SCHEMA)
            _migrate(connection, version)
            connection.executescript(INDEXES)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as error:
            raise JournalError(f"cannot open the journal {path} for writing: {error}") from None
        return cls(connection, path, readonly=False)

    @classmethod
    def open_readonly(cls, state_dir: str | Path) -> Journal:
        """Open for reading only (never creates or changes anything)."""
        path = Path(state_dir) / JOURNAL_NAME
        if not path.is_file():
            raise JournalError(f"no journal at {path}: has `ctpi watch --state {state_dir}` run yet?")
        try:
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0, check_same_thread=False)
            connection.execute("SELECT 1 FROM slices LIMIT 1")
        except sqlite3.Error as error:
            raise JournalError(f"cannot read the journal {path}: {error}") from None
        return cls(connection, path, readonly=True)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, work):
        """Run ``work(connection)`` in one IMMEDIATE transaction; storage failures become
        :class:`JournalError` and leave nothing half-written."""
        try:
            return immediate(self._db, work)
        except sqlite3.Error as error:
            raise JournalError(f"cannot write the journal {self.path}: {error}") from None

    # -- the daemon's writes -----------------------------------------------------------------

    def record(self, results: list[SliceResult], positive_label: str, negative_label: str) -> list[Recorded]:
        """Commit a group of results in one transaction; idempotent per (path, sha256) while
        the earlier record's file has not been moved. Updates the touched studies."""

        def work(db: sqlite3.Connection) -> list[Recorded]:
            now = time.time()
            recorded, studies = [], {}
            for result in results:
                db.execute("DELETE FROM claims WHERE path = ?", (result.path,))
                existing = db.execute(
                    "SELECT id, stored_as FROM slices WHERE path = ? AND sha256 IS ? AND moved_at IS NULL",
                    (result.path, result.sha256),
                ).fetchone()
                if existing is not None:
                    recorded.append(Recorded(existing["id"], result.path, existing["stored_as"], False))
                    continue
                cursor = db.execute(
                    "INSERT INTO slices (path, study, sha256, size, status, label, positive, positive_probability,"
                    " probabilities, threshold, model_name, model_sha256, reason, message, format, mode, latency_ms,"
                    " seen_at, recorded_at, uncertain_band, bundle_sha256)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        result.path, result.study, result.sha256, result.size, result.status, result.label,
                        None if result.positive is None else int(result.positive), result.positive_probability,
                        json.dumps(result.probabilities) if result.probabilities is not None else None,
                        result.threshold, result.model_name, result.model_sha256, result.reason, result.message,
                        result.format, result.mode, json.dumps(result.latency_ms), result.seen_at, now,
                        json.dumps(result.uncertain_band) if result.uncertain_band is not None else None,
                        result.bundle_sha256,
                    ),
                )
                record_id = cursor.lastrowid
                if not result.movable:  # the file is gone: nothing to move
                    db.execute("UPDATE slices SET moved_at = ? WHERE id = ?", (now, record_id))
                    recorded.append(Recorded(record_id, result.path, None, True))
                else:
                    stored_as = stored_name(record_id, result.path, result.status)
                    db.execute("UPDATE slices SET stored_as = ? WHERE id = ?", (stored_as, record_id))
                    recorded.append(Recorded(record_id, result.path, stored_as, False))
                if result.study is not None:
                    studies[result.study] = (result.threshold, result.model_sha256)
            for name, (threshold, model_sha256) in studies.items():
                self._update_study(db, name, threshold, model_sha256, positive_label, negative_label, now)
            return recorded

        return self._write(work)

    @staticmethod
    def _update_study(db, name, threshold, model_sha256, positive_label, negative_label, now) -> None:
        rows = db.execute(
            "SELECT id, status, label, positive_probability, threshold, recorded_at FROM slices WHERE study = ? ORDER BY id",
            (name,),
        ).fetchall()
        readable = [row for row in rows if row["status"] == "ok"]
        if threshold is None:  # a group of rejected files only: keep the study's threshold
            known = db.execute("SELECT threshold FROM studies WHERE name = ?", (name,)).fetchone()
            threshold = known["threshold"] if known else (readable[-1]["threshold"] if readable else None)
        verdict = aggregate(
            [row["positive_probability"] for row in readable], threshold or 0.0, positive_label, negative_label,
            uncertain=[row["label"] == UNCERTAIN for row in readable],
        )
        db.execute(
            "INSERT INTO studies (name, slices, rejected, positive_slices, probability, label, positive, threshold, rule,"
            " top_slice_id, model_sha256, first_at, updated_at, uncertain_slices) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET slices = excluded.slices, rejected = excluded.rejected,"
            " positive_slices = excluded.positive_slices, uncertain_slices = excluded.uncertain_slices,"
            " probability = excluded.probability, label = excluded.label,"
            " positive = excluded.positive, threshold = excluded.threshold, rule = excluded.rule, top_slice_id = excluded.top_slice_id,"
            " model_sha256 = coalesce(excluded.model_sha256, studies.model_sha256), updated_at = excluded.updated_at",
            (
                name, verdict.slices, len(rows) - len(readable), verdict.positive_slices, verdict.probability,
                verdict.label, None if verdict.label is None else int(verdict.label == positive_label), threshold, RULE,
                readable[verdict.top_index]["id"] if verdict.top_index is not None else None,
                model_sha256, rows[0]["recorded_at"] if rows else now, now, verdict.uncertain_slices,
            ),
        )

    def claim(self, path: str, signature: str) -> int:
        """Count an attempt at reading ``path`` before decoding it; returns the attempts so far
        (1 the first time; restarts at 1 when the file changed)."""

        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT signature, attempts FROM claims WHERE path = ?", (path,)).fetchone()
            attempts = row["attempts"] + 1 if row is not None and row["signature"] == signature else 1
            db.execute(
                "INSERT INTO claims (path, signature, attempts, claimed_at) VALUES (?, ?, ?, ?) ON CONFLICT(path)"
                " DO UPDATE SET signature = excluded.signature, attempts = excluded.attempts, claimed_at = excluded.claimed_at",
                (path, signature, attempts, time.time()),
            )
            return attempts

        return self._write(work)

    def mark_moved(self, record_ids: list[int]) -> None:
        if record_ids:
            now = time.time()
            self._write(lambda db: db.executemany("UPDATE slices SET moved_at = ? WHERE id = ?", [(now, i) for i in record_ids]))

    def unmoved(self) -> list[dict]:
        """Records whose file may still be in the inbox (moves a crash interrupted)."""
        return [dict(row) for row in self._db.execute("SELECT id, path, sha256, stored_as FROM slices WHERE moved_at IS NULL ORDER BY id")]

    def prunable(self, before: float, limit: int = 500) -> list[dict]:
        """Triaged files moved to ``done/`` before ``before`` (unix seconds) and not yet pruned,
        oldest first. Rejected files are never listed: they wait for a person."""
        rows = self._db.execute(
            "SELECT id, stored_as FROM slices WHERE status = 'ok' AND pruned_at IS NULL AND moved_at < ?"
            " AND stored_as IS NOT NULL ORDER BY moved_at LIMIT ?",
            (before, int(limit)),
        )
        return [dict(row) for row in rows]

    def mark_pruned(self, record_ids: list[int]) -> None:
        if record_ids:
            now = time.time()
            self._write(lambda db: db.executemany("UPDATE slices SET pruned_at = ? WHERE id = ?", [(now, i) for i in record_ids]))

    def beat(self, data: dict) -> None:
        """Replace the heartbeat row."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO heartbeat (id, beat_at, data) VALUES (1, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET beat_at = excluded.beat_at, data = excluded.data",
                (time.time(), json.dumps(data)),
            )
        )

    # -- the read API ---------------------------------------------------------------------------

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

    def heartbeat(self) -> dict | None:
        """The daemon's last heartbeat (its JSON fields plus ``beat_at`` and ``age_seconds``)."""
        row = self._db.execute("SELECT beat_at, data FROM heartbeat WHERE id = 1").fetchone()
        if row is None:
            return None
        data = json.loads(row["data"])
        data["beat_at"] = iso(row["beat_at"])
        data["age_seconds"] = max(0.0, time.time() - row["beat_at"])
        return data
