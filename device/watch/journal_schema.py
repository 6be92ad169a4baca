"""The journal's SQLite schema (``STATE/journal.sqlite``) and the migrations that bring a journal
of an older schema up to this one, keeping every row. See :mod:`device.watch.journal`."""

from __future__ import annotations

import sqlite3

JOURNAL_NAME = "journal.sqlite"
SCHEMA_VERSION = 5  # 2: slices.pruned_at (retention); 3: slices.uncertain_band, studies.uncertain_slices;
# 4: slices.bundle_sha256; 5: the heatmaps table (a new table: SCHEMA's CREATE ... IF NOT EXISTS adds it)

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
CREATE TABLE IF NOT EXISTS heatmaps (
    slice_id INTEGER PRIMARY KEY,       -- slices.id of a study's top slice (device.watch.evidence)
    grid INTEGER,                       -- the coarse map is grid x grid
    coarse BLOB,                        -- grid*grid float32 little-endian, row by row; NULL: could not be made
    base_probability REAL,              -- P(positive) of the intact slice
    model_sha256 TEXT,                  -- the model file that made it (the one that scored the slice)
    error TEXT,                         -- why there is no map (file pruned, unreadable, another model)
    seconds REAL,                       -- how long it took
    made_at REAL NOT NULL
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


def migrate(connection: sqlite3.Connection, version: int) -> None:
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
