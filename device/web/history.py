"""The watch daemon's journal as the web page shows it: filtered pages of slices, CSV, status.

Read-only and paged (a Pi's page never loads the whole journal); built on
:class:`device.watch.journal.Journal`'s read API, so the page and ``ctpi results`` agree. For studies
that arrived over DICOM, the DICOM node's ledger (read-only too) adds where the study came
from (the calling AE title) and whether its result reached the PACS.
"""

from __future__ import annotations

import csv
import io
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from pathlib import Path

from device.core.band import display_label
from device.node.ledger import NODE_FOLDER, Ledger
from device.watch.journal import Journal

CSV_COLUMNS = (
    "id", "recorded_at", "study", "path", "status", "label", "positive_probability", "threshold",
    "reason", "message", "format", "model_name", "model_sha256", "bundle_sha256", "sha256", "stored_as", "pruned_at",
)  # fmt: skip
REJECTED = "rejected"  # the label filter's choice for files that were refused


@dataclass(frozen=True)
class HistoryFilter:
    """What the history table shows: slices recorded since a day (UTC), with one label (or
    ``rejected``), in one study; ``None`` means any."""

    since: date | None = None
    label: str | None = None
    study: str | None = None

    def query(self) -> dict:
        arguments = {"study": self.study}
        if self.since is not None:
            arguments["since"] = datetime.combine(self.since, time.min, tzinfo=timezone.utc)
        if self.label == REJECTED:
            arguments["status"] = "rejected"
        elif self.label is not None:
            arguments["label"] = self.label
        return arguments


@dataclass(frozen=True)
class Page:
    rows: list[dict]
    number: int  # from 0
    has_next: bool


def slice_page(journal: Journal, chosen: HistoryFilter, number: int, size: int) -> Page:
    """One page of matching slices, newest first (one extra row tells whether more follow)."""
    rows = journal.query_slices(**chosen.query(), limit=size + 1, offset=number * size)
    return Page(rows=rows[:size], number=number, has_next=len(rows) > size)


def table_rows(rows: list[dict]) -> list[dict]:
    """Slice records as the table's columns (short model hash, probability rounded)."""
    return [
        {
            "id": row["id"],
            "recorded (UTC)": (row["recorded_at"] or "")[:19].replace("T", " "),
            "study": row["study"] or "",
            "file": row["path"],
            "label": display_label(row["label"]) if row["status"] == "ok" else f"rejected: {row['reason']}",
            "probability": None if row["positive_probability"] is None else round(row["positive_probability"], 3),
            "model": (row["model_sha256"] or "")[:12],
            "bundle": (row.get("bundle_sha256") or "")[:12],
        }
        for row in rows
    ]


def to_csv(journal: Journal, chosen: HistoryFilter) -> str:
    """Every slice matching ``chosen`` as CSV (the download button's content)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(journal.query_slices(**chosen.query(), limit=None))
    return buffer.getvalue()


def disk_free(folder: Path) -> dict | None:
    """Free and total space of the file system holding ``folder`` (or its nearest parent)."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return {"free_mb": usage.free / 1e6, "total_mb": usage.total / 1e6, "path": str(folder)}


def process_memory_mb() -> float | None:
    """Resident set size of this process (Linux), for the status panel."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


# -- studies that arrived over DICOM ----------------------------------------------------------

def dicom_origins(state: Path) -> dict[str, dict]:
    """Per study folder that arrived over DICOM, its row of :meth:`Ledger.origins`; empty when
    the node never ran with this state folder or its ledger cannot be read right now."""
    ledger = Ledger.open_readonly(Path(state) / NODE_FOLDER)
    if ledger is None:
        return {}
    try:
        return ledger.origins()
    except sqlite3.Error:  # being created, or an older node's schema: the page goes on without it
        return {}
    finally:
        ledger.close()


def utc(timestamp: float | None) -> str:
    return "?" if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def delivery(origin: dict) -> tuple[str, str]:
    """Where the study's result is, as ``(state, words)``; state is one of ``receiving``,
    ``triage``, ``queued``, ``failed``, ``sent``, ``not made``. A send error is shown as the node
    recorded it (an address or a status, never a patient field); why a result could not be
    *made* is left to the node's log, where the dataset's own values may appear."""
    state, pending, sent = origin["state"], origin.get("pending") or 0, origin.get("sent") or 0
    earlier = f"; an earlier result was sent at {utc(origin['sent_at'])}" if sent and origin.get("sent_at") else ""
    if state == "receiving":
        return "receiving", "not made yet: instances are still arriving" + earlier
    if state == "complete":
        return "triage", "not made yet: waiting for the watch daemon to triage every instance" + earlier
    if state == "failed":
        return "not made", "the result could not be made (see the DICOM node's log)" + earlier
    if pending and origin.get("attempts"):
        attempts = origin["attempts"]
        return "failed", (f"not sent: {origin.get('last_error') or 'no answer'} ({attempts} attempt{'s' if attempts != 1 else ''}, "
                          f"next try {utc(origin.get('next_at'))})")
    if pending:
        return "queued", f"queued since {utc(origin.get('reported_at'))}, not sent yet"
    return "sent", f"sent to the PACS at {utc(origin.get('sent_at'))}"
