"""What the DICOM node did: its own SQLite ledger in ``STATE/dicom/node.sqlite``.

The watch journal stays the record of triage (one writer: ``ctpi watch``); this ledger is the
node's, written only by ``ctpi dicom``:

- ``instances``: every instance acknowledged to a sender, keyed by the sha256 of its
  SOPInstanceUID (no UID, name or date of the patient is stored here), with the study folder
  and file name it was written as. A row exists before the file is renamed into the inbox and
  before the sender hears *success*; a resend finds it and is not written again.
- ``studies``: per study folder, the calling AE, arrival times, and where the result is
  (``receiving`` -> ``complete`` -> ``reported`` -> ``sent``).
- ``outbox``: result files (SR, Secondary Capture) waiting for the destination, with
  attempts and the last error; a row is marked sent only after the destination's success.
- ``refusals`` and ``counters``: what was turned away and why, associations, sends.

``synchronous=FULL``: a row the sender was told about must survive a power cut.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from device.watch.journal import immediate

NODE_FOLDER = "dicom"  # STATE/dicom/: the node's ledger, kept headers and outbox
LEDGER_NAME = "node.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_hash TEXT PRIMARY KEY,          -- sha256 of SOPInstanceUID
    study TEXT NOT NULL,                -- inbox folder (hash of StudyInstanceUID)
    name TEXT NOT NULL,                 -- file name inside it
    calling_aet TEXT,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study);
CREATE TABLE IF NOT EXISTS studies (
    study TEXT PRIMARY KEY,
    calling_aet TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete', 'reported', 'sent', 'failed')),
    round INTEGER NOT NULL DEFAULT 0,   -- results made for this study (a late instance reopens it)
    completed_at REAL,
    reported_at REAL,
    sent_at REAL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    study TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- sr | sc
    path TEXT NOT NULL,                 -- relative to STATE/dicom
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    sent_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(next_at) WHERE sent_at IS NULL;
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    calling_aet TEXT,
    reason TEXT NOT NULL,               -- aet-not-allowed, sop-class, too-large, broken, ...
    message TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class Ledger:
    """One connection; the node serialises its writes (one lock around a store)."""

    def __init__(self, connection: sqlite3.Connection, path: Path):
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self.path = path

    @classmethod
    def open(cls, folder: str | Path) -> Ledger:
        path = Path(folder) / LEDGER_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        return cls(connection, path)

    @classmethod
    def open_readonly(cls, folder: str | Path) -> Ledger | None:
        path = Path(folder) / LEDGER_NAME
        if not path.is_file():
            return None
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0, check_same_thread=False)
        return cls(connection, path)

    def close(self) -> None:
        self._db.close()

    def _write(self, work):
        return immediate(self._db, work)

    # -- instances -------------------------------------------------------------------------

    def instance(self, sop_hash: str) -> dict | None:
        row = self._db.execute("SELECT * FROM instances WHERE sop_hash = ?", (sop_hash,)).fetchone()
        return dict(row) if row else None

    def add_instance(self, sop_hash: str, study: str, name: str, calling_aet: str | None, size: int) -> None:
        """Record an instance and touch its study (reopened if a result was already made)."""

        def work(db):
            now = time.time()
            db.execute(
                "INSERT INTO instances (sop_hash, study, name, calling_aet, size, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (sop_hash, study, name, calling_aet, size, now),
            )
            db.execute(
                "INSERT INTO studies (study, calling_aet, instances, first_at, last_at, state) VALUES (?, ?, 1, ?, ?, 'receiving')"
                " ON CONFLICT(study) DO UPDATE SET instances = instances + 1, last_at = excluded.last_at,"
                " state = 'receiving', calling_aet = coalesce(studies.calling_aet, excluded.calling_aet)",
                (study, calling_aet, now, now),
            )
            self._bump(db, "instances_received")

        self._write(work)

    def instances_of(self, study: str) -> list[dict]:
        return [dict(row) for row in self._db.execute("SELECT * FROM instances WHERE study = ? ORDER BY received_at", (study,))]

    # -- studies -----------------------------------------------------------------------------

    def studies_in(self, state: str) -> list[dict]:
        return [dict(row) for row in self._db.execute("SELECT * FROM studies WHERE state = ? ORDER BY last_at", (state,))]

    def study(self, study: str) -> dict | None:
        row = self._db.execute("SELECT * FROM studies WHERE study = ?", (study,)).fetchone()
        return dict(row) if row else None

    def set_study(self, study: str, state: str, only_if: str | None = None, **values) -> bool:
        """Move a study to ``state`` (only from ``only_if`` when given: a late instance that
        reopened it in between wins). Returns whether it moved."""
        stamp = {"complete": "completed_at", "reported": "reported_at", "sent": "sent_at"}.get(state)
        sets = ["state = ?"] + [f"{key} = ?" for key in values]
        args = [state, *values.values()]
        if stamp:
            sets.append(f"{stamp} = ?")
            args.append(time.time())
        where = "study = ?" + (" AND state = ?" if only_if else "")
        args += [study] + ([only_if] if only_if else [])
        return self._write(lambda db: db.execute(f"UPDATE studies SET {', '.join(sets)} WHERE {where}", args).rowcount) > 0

    # -- outbox ------------------------------------------------------------------------------

    def queue_results(self, study: str, files: list[tuple[str, str]], only_if: str = "complete") -> bool:
        """Put a study's result files (kind, path) in the outbox and mark it reported, in one
        transaction; nothing happens if the study left ``only_if`` meanwhile."""

        def work(db):
            now = time.time()
            moved = db.execute(
                "UPDATE studies SET state = 'reported', reported_at = ?, round = round + 1 WHERE study = ? AND state = ?",
                (now, study, only_if),
            ).rowcount
            if moved:
                db.executemany(
                    "INSERT INTO outbox (study, kind, path, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
                    [(study, kind, path, now, now) for kind, path in files],
                )
            return moved > 0

        return self._write(work)

    def due(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        return [dict(row) for row in self._db.execute("SELECT * FROM outbox WHERE sent_at IS NULL AND next_at <= ? ORDER BY id", (now,))]

    def pending(self, study: str) -> int:
        return self._db.execute("SELECT count(*) FROM outbox WHERE study = ? AND sent_at IS NULL", (study,)).fetchone()[0]

    def mark_sent(self, outbox_id: int) -> None:
        def work(db):
            db.execute("UPDATE outbox SET sent_at = ?, attempts = attempts + 1, last_error = NULL WHERE id = ?", (time.time(), outbox_id))
            self._bump(db, "results_sent")

        self._write(work)

    def mark_failed(self, outbox_id: int, error: str, retry_seconds: float) -> None:
        now = time.time()
        self._write(
            lambda db: db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_at = ? WHERE id = ?",
                (error, now + retry_seconds, outbox_id),
            )
        )

    # -- refusals and counters ---------------------------------------------------------------

    def refuse(self, calling_aet: str | None, reason: str, message: str) -> None:
        def work(db):
            db.execute("INSERT INTO refusals (at, calling_aet, reason, message) VALUES (?, ?, ?, ?)", (time.time(), calling_aet, reason, message))
            self._bump(db, f"refused_{reason}")

        self._write(work)

    def count(self, name: str, by: int = 1) -> None:
        self._write(lambda db: self._bump(db, name, by))

    @staticmethod
    def _bump(db, name: str, by: int = 1) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def summary(self) -> dict:
        """What ``ctpi status`` and the page show: counters, studies by state, outbox."""
        counters = {row["name"]: row["value"] for row in self._db.execute("SELECT name, value FROM counters ORDER BY name")}
        states = {row["state"]: row["n"] for row in self._db.execute("SELECT state, count(*) AS n FROM studies GROUP BY state")}
        outbox = self._db.execute(
            "SELECT coalesce(sum(sent_at IS NULL), 0) AS pending, coalesce(sum(sent_at IS NOT NULL), 0) AS sent,"
            " max(CASE WHEN sent_at IS NULL THEN last_error END) AS last_error FROM outbox"
        ).fetchone()
        return {"counters": counters, "studies": states, "outbox": dict(outbox)}

    def origins(self) -> dict[str, dict]:
        """Per study folder: the calling AE, the study's state, and where its results are:
        ``pending`` / ``sent`` outbox files (every round), the attempts, next try and last error
        of the unsent ones (what the page shows; no UID or patient field is stored here)."""
        rows = self._db.execute(
            "SELECT s.study, s.calling_aet, s.state, s.instances, s.first_at, s.last_at, s.reported_at, s.sent_at,"
            " s.last_error AS study_error, o.pending, o.sent, o.attempts, o.next_at, o.last_error"
            " FROM studies s LEFT JOIN ("
            "  SELECT study, sum(sent_at IS NULL) AS pending, sum(sent_at IS NOT NULL) AS sent,"
            "  max(CASE WHEN sent_at IS NULL THEN attempts END) AS attempts, min(CASE WHEN sent_at IS NULL THEN next_at END) AS next_at,"
            "  (SELECT last_error FROM outbox x WHERE x.study = outbox.study AND x.sent_at IS NULL AND x.last_error IS NOT NULL"
            "   ORDER BY x.id DESC LIMIT 1) AS last_error"
            "  FROM outbox GROUP BY study"
            " ) o ON o.study = s.study"
        )
        return {row["study"]: dict(row) for row in rows}
