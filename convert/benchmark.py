"""``ctpi bench`` figures for the model card, measured on the candidate bundle.

The benchmark runs as a subprocess (``python -m device.cli bench --json``), exactly the
command a user would run, so the card reports the device-side tool's own figures rather than
a second timing implementation. It runs before the final manifest is written because
``MODEL_CARD.md`` is itself a checksummed bundle file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def bench_command(bundle: Path, fmt: str, threads: str, runs: int, images: Path | None) -> list[str]:
    command = [sys.executable, "-m", "device.cli", "bench", "--model", str(bundle), "--format", fmt]
    command += ["--threads", threads, "--runs", str(runs), "--json"]
    if images is not None:
        command += ["--images", str(images)]
    return command


def bench_formats(
    bundle: Path, formats: list[str], threads: str = "1,2", runs: int = 50, images: Path | None = None, timeout_s: float = 900
) -> dict:
    """``{"machine": ..., "settings": ..., "results": [...]}`` over every format, or
    ``{"error": ...}`` when the benchmark cannot run (the conversion goes on; the card says so)."""
    # Other work on the machine inflates latency; the card says how busy it was.
    report: dict = {"results": [], "load_average_1min": os.getloadavg()[0]}
    for fmt in formats:
        command = bench_command(bundle, fmt, threads, runs, images)
        log.info("benchmarking %s: %s", fmt, " ".join(command[1:]))
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"ctpi bench --format {fmt} did not finish in {timeout_s:.0f} s"}
        try:
            output = json.loads(completed.stdout)
        except json.JSONDecodeError:
            detail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"ctpi bench --format {fmt} failed (exit {completed.returncode}): {detail}"}
        report["machine"] = output.get("machine", {})
        report["settings"] = output.get("settings", {})
        for result in output.get("results", []):
            result.pop("bundle", None)  # the candidate's scratch folder, not where the bundle lives
            report["results"].append(result)
    return report
