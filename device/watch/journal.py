"""What happened to each slice: the SQLite (WAL) journal of record in ``STATE/journal.sqlite``.

Writers: only the watch daemon (:meth:`Journal.open`). Readers (``ctpi results``,
``ctpi status``, the web UI's history page) use the read API
(:class:`~device.watch.journal_view.JournalView`, in :mod:`device.watch.journal_view`), which never writes:

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
from pathlib import Path, PurePosixPath

from device.core.band import UNCERTAIN
from device.core.studies import RULE, aggregate
from device.watch.journal_schema import INDEXES, JOURNAL_NAME, SCHEMA, SCHEMA_VERSION, migrate
from device.watch.journal_view import JournalView

HEATMAP_HORIZON_SECONDS = 24 * 3600.0
"""Study heatmaps are made for studies updated within this time (:meth:`Journal.heatmap_due`)."""


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


def stored_name(record_id: int, path: str, status: str) -> str:
    """``done/<folders>/<id>-<name>``: the id keeps equal names of different drops apart."""
    relative = PurePosixPath(path)
    folder = PurePosixPath("done" if status == "ok" else "rejected", *relative.parts[:-1])
    return str(folder / f"{record_id:06d}-{relative.name}")


class Journal(JournalView):
    """One connection to the journal. The daemon is the only writer."""

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
            migrate(connection, version)
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

    def heatmap_due(self, horizon_seconds: float = HEATMAP_HORIZON_SECONDS) -> dict | None:
        """The top slice (``id``, ``stored_as``, ``model_sha256``) of the most recently updated
        study that has no heatmap record yet and whose file has left the inbox; None when every
        study has one. Newest first, so a study that just arrived never waits behind old ones.
        Only studies updated within ``horizon_seconds``: the map is for the result a DICOM node
        sends soon after a study completes, and a journal upgraded with years of studies must
        not keep a Pi busy drawing maps nobody will send."""
        row = self._db.execute(
            "SELECT s.id, s.stored_as, s.model_sha256, s.pruned_at FROM studies AS st JOIN slices AS s ON s.id = st.top_slice_id"
            " WHERE st.updated_at >= ? AND s.moved_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM heatmaps AS h WHERE h.slice_id = s.id)"
            " ORDER BY st.updated_at DESC LIMIT 1",
            (time.time() - horizon_seconds,),
        ).fetchone()
        return dict(row) if row is not None else None

    def record_heatmap(self, slice_id: int, made_at: float, grid: int | None = None, coarse=None,
                       base_probability: float | None = None, model_sha256: str | None = None, error: str | None = None,
                       seconds: float | None = None) -> None:
        """Store a slice's coarse occlusion map (``grid x grid`` float32), or why there is none."""
        blob = None if coarse is None else coarse.astype("<f4").tobytes()
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO heatmaps (slice_id, grid, coarse, base_probability, model_sha256, error, seconds, made_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (slice_id, grid, blob, base_probability, model_sha256, error, seconds, made_at),
            )
        )

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
