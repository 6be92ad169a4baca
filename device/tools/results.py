"""``ctpi results`` (export the journal) and ``ctpi status`` (is the daemon alive and well).

Both only read the journal (:meth:`device.watch.journal.Journal.open_readonly`), so they are safe
to run while the daemon writes. ``status`` exits 0 when the daemon's heartbeat is fresh and
it is taking files, 1 otherwise (stale heartbeat, stopped, or blocked by a storage error),
so it works as a monitoring probe.
"""

from __future__ import annotations

import csv
import re
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from device.core.band import display_label
from device.node import daemon as node
from device.watch.journal import Journal, JournalError

CSV_COLUMNS = (
    "id", "recorded_at", "path", "study", "status", "label", "positive_probability", "threshold", "uncertain_band",
    "reason", "message", "sha256", "size", "format", "model_name", "model_sha256", "bundle_sha256", "stored_as",
    "pruned_at",
)
STALE_AFTER_BEATS = 3
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d`` (ago) or an ISO 8601 date/time (UTC unless it says otherwise)."""
    match = _RELATIVE.match(text.strip().lower())
    now = now or datetime.now(timezone.utc)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected e.g. 30m, 2h, 7d or 2026-01-31T08:00") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def register(subparsers) -> None:
    results = subparsers.add_parser("results", help="export the watch daemon's results (table, --json or --csv)")
    results.add_argument("--state", type=Path, required=True, help="the daemon's state folder")
    output = results.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON: slices and study verdicts")
    output.add_argument("--csv", action="store_true", help="CSV of slice records")
    results.add_argument("--since", default=None, help="only results recorded since: 30m, 2h, 7d or an ISO date/time")
    results.add_argument("--study", default=None, help="only this study (inbox subfolder)")
    results.add_argument("--label", default=None, help="only slices with this label")
    results.add_argument("--limit", type=int, default=None, help="at most this many slices (newest first)")
    results.set_defaults(handler=run_results)

    status = subparsers.add_parser("status", help="is the watch daemon alive: heartbeat, model, counts, queue, disk")
    status.add_argument("--state", type=Path, required=True, help="the daemon's state folder")
    status.add_argument("--json", action="store_true", help="machine-readable JSON output")
    status.set_defaults(handler=run_status)


def _open(state: Path) -> Journal:
    try:
        return Journal.open_readonly(state)
    except JournalError as error:
        raise FileNotFoundError(str(error)) from None  # the CLI reports it with exit status 2


def run_results(args) -> int:
    from device.cli import print_json

    since = parse_since(args.since) if args.since else None
    with _open(args.state) as journal:
        slices = journal.query_slices(since=since, study=args.study, label=args.label, limit=args.limit)
        studies = [s for s in journal.studies() if args.study is None or s["name"] == args.study]
    if args.json:
        print_json({"slices": slices, "studies": studies})
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(slices)
    else:
        print(format_results(slices, studies))
    return 0


def format_results(slices: list[dict], studies: list[dict]) -> str:
    lines = []
    if studies:
        lines.append(f"{'study':<24} {'verdict':<10} {'P(max)':>7} {'positive':>8} {'uncertain':>9} {'slices':>6} {'rejected':>8}")
        for study in studies:
            probability = "-" if study["probability"] is None else f"{study['probability']:.3f}"
            lines.append(
                f"{study['name']:<24} {study['label'] or '-':<10} {probability:>7} {study['positive_slices']:>8} "
                f"{study.get('uncertain_slices') or 0:>9} {study['slices']:>6} {study['rejected']:>8}"
            )
        lines.append("")
    lines.append(f"{'recorded (UTC)':<19} {'file':<40} {'result':<18} {'P':>6}  bundle/reason")
    for record in slices:
        when = (record["recorded_at"] or "")[:19].replace("T", " ")
        if record["status"] == "ok":
            lines.append(
                f"{when:<19} {record['path']:<40} {display_label(record['label']):<18} {record['positive_probability']:>6.3f}  "
                f"{(record.get('bundle_sha256') or record['model_sha256'] or '')[:12]}"
            )
        else:
            lines.append(f"{when:<19} {record['path']:<40} {'REJECTED':<18} {'':>6}  {record['reason']}: {record['message']}")
    lines.append(f"{len(slices)} slice(s)")
    return "\n".join(lines)


def _tls_fingerprint(state: Path) -> str | None:
    """The fingerprint of the page's self-signed certificate (``STATE/tls``), if it made one."""
    from device.web.tls import CERT_NAME, TlsError, fingerprint

    try:
        return fingerprint(state / "tls" / CERT_NAME)
    except (OSError, TlsError):
        return None


def gather_status(state: Path) -> dict:
    """Everything ``ctpi status`` shows, as a dict; ``healthy`` says whether the daemon runs."""
    with _open(state) as journal:
        heartbeat = journal.heartbeat()
        counts = journal.counts()
    usage = shutil.disk_usage(state)
    if heartbeat is None:
        daemon, healthy = "never started", False
    else:
        stale = heartbeat["age_seconds"] > STALE_AFTER_BEATS * float(heartbeat.get("heartbeat_seconds") or 5.0)
        if heartbeat["state"] == "stopped":
            daemon = "stopped"
        elif stale:
            daemon = "not responding (stale heartbeat: crashed, killed, or the state folder is not writable)"
        else:
            daemon = heartbeat["state"]
        healthy = daemon == "running"
    return {
        "state_folder": str(state),
        "daemon": daemon,
        "healthy": healthy,
        "heartbeat": heartbeat,
        "counts": counts,
        "disk": {"free_mb": usage.free / 1e6, "total_mb": usage.total / 1e6},
        "dicom": node.status(state),
        "tls_fingerprint": _tls_fingerprint(state),
        "checked_at": time.time(),
    }


def format_status(status: dict) -> str:
    heartbeat = status["heartbeat"] or {}
    counts = status["counts"]
    model = heartbeat.get("model") or {}
    lines = [
        f"daemon      {status['daemon']}" + (f" (pid {heartbeat['pid']})" if heartbeat else ""),
        f"heartbeat   {heartbeat['age_seconds']:.1f} s ago" if heartbeat else "heartbeat   none",
    ]
    if heartbeat.get("message"):
        lines.append(f"problem     {heartbeat['message']}")
    if model:
        lines.append(f"model       {model['name']} {model['format']} sha256 {model['sha256'][:16]}… threshold {model['threshold']:.3f}")
        if model.get("site_profile"):
            lines.append(f"site        {model['site_profile']}")
        if model.get("site_profile_error"):
            lines.append(f"site        REFUSED: {model['site_profile_error']}")
        lines.append(f"inbox       {heartbeat['inbox']}: {heartbeat['waiting']} settling, {heartbeat['queue']} queued")
        if heartbeat.get("rss_mb"):
            lines.append(f"memory      {heartbeat['rss_mb']:.0f} MB (peak {heartbeat['peak_rss_mb']:.0f} MB)")
    lines.append(
        f"slices      {counts['slices']} ({counts['ok']} ok, {counts['positive']} positive, {counts['rejected']} rejected)"
        + (f", {counts['awaiting_move']} awaiting their move" if counts["awaiting_move"] else "")
        + (f"; images of {counts['pruned']} deleted by retention (results kept)" if counts.get("pruned") else "")
    )
    if counts["rejected_by_reason"]:
        lines.append("rejected    " + ", ".join(f"{reason} {n}" for reason, n in counts["rejected_by_reason"].items()))
    lines.append(
        f"studies     {counts['studies']} ({counts['positive_studies']} positive"
        + (f", {counts['review_studies']} to review" if counts.get("review_studies") else "") + ")"
    )
    lines.extend(node.format_status(status.get("dicom")))
    if status.get("tls_fingerprint"):
        lines.append(f"page TLS    SHA-256 {status['tls_fingerprint']} (the page's self-signed certificate)")
    lines.append(f"disk free   {status['disk']['free_mb']:.0f} MB of {status['disk']['total_mb']:.0f} MB ({status['state_folder']})")
    return "\n".join(lines)


def run_status(args) -> int:
    from device.cli import print_json

    status = gather_status(args.state)
    if args.json:
        print_json(status)
    else:
        print(format_status(status))
    return 0 if status["healthy"] else 1
