"""The watch daemon's journal as the web page shows it: filtered pages of slices, CSV, status.

Read-only and paged (a Pi's page never loads the whole journal); built on
:class:`device.journal.Journal`'s read API, so the page and ``ctpi results`` agree.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from pathlib import Path

from device.band import display_label
from device.journal import Journal

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
