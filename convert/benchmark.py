"""``ctpi bench`` figures for the model card, measured on the candidate bundle.

The benchmark runs as a subprocess (``python -m device.cli bench --json``), exactly the
command a user would run, so the card reports the device-side tool's own figures rather than
a second timing implementation. It runs before the final manifest is written because
``MODEL_CARD.md`` is itself a checksummed bundle file.

``python -m convert.benchmark --bundle B`` measures an existing bundle again, in place: a
bundle converted with ``--no-bench``, or one to be measured on a quieter machine. Only the
manifest's ``conversion.bench`` and the card's Speed section change; the manifest is resealed
and the model files are untouched.

Exit codes: 0 measured, 1 the benchmark failed (bundle unchanged), 2 bad bundle or flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
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


SPEED_HEADING = "## Speed"


def with_speed_section(card: str, lines: list[str]) -> str:
    """``card`` with the body of its Speed section replaced by ``lines`` (the section is
    appended when the card has none)."""
    section = "\n".join([SPEED_HEADING, "", *lines, ""])
    start = card.find(SPEED_HEADING + "\n")
    if start < 0:
        return card.rstrip("\n") + "\n\n" + section
    end = card.find("\n## ", start + len(SPEED_HEADING))
    tail = card[end + 1 :] if end >= 0 else ""
    return card[:start] + section + ("\n" + tail if tail else "")


def rebench_bundle(path: Path, threads: str = "1,2", runs: int = 50, images: Path | None = None, command: str = "") -> dict:
    """Measure every format of the bundle at ``path`` and record it in place (see the module
    docstring). Raises ``RuntimeError`` when the benchmark fails: nothing is written then."""
    from convert.model_card import bench_section
    from device.core.bundle import load_bundle, write_manifest

    bundle = load_bundle(path)
    manifest = json.loads(json.dumps(bundle.manifest))
    bench = bench_formats(bundle.path, list(manifest["formats"]), threads, runs, images)
    if "error" in bench:
        raise RuntimeError(bench["error"])
    bench["command"] = command
    manifest.setdefault("conversion", {})["bench"] = bench
    card_path = bundle.path / "MODEL_CARD.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else f"# Model card: {bundle.name}\n"
    card_path.write_text(with_speed_section(card, bench_section(bench)), encoding="utf-8")
    write_manifest(bundle.path, manifest)
    load_bundle(bundle.path)  # proves the result verifies
    return bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.benchmark", description="Measure a bundle with ctpi bench and record it in its manifest and model card.")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder to measure in place")
    parser.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per configuration (default 50)")
    parser.add_argument("--images", type=Path, default=None, help="folder of slices for the end-to-end figures (default: ctpi bench's own)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from device.core.bundle import BundleError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        bench = rebench_bundle(args.bundle, args.threads, args.runs, args.images, "python -m convert.benchmark " + shlex.join(argv))
    except (BundleError, FileNotFoundError) as error:
        print(f"convert.benchmark: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"convert.benchmark: {error}; the bundle is unchanged", file=sys.stderr)
        return 1
    for r in bench["results"]:
        if "error" in r:
            print(f"{r.get('format')} threads {r.get('threads')}: error: {r['error']}")
        else:
            print(f"{r['format']:8s} threads {r['threads']}: invoke {r['invoke_ms']['mean']:.2f} ms, end-to-end "
                  f"{r['end_to_end_ms']['mean']:.2f} ms, {r['throughput_per_s']:.1f} slices/s, peak RSS {r['rss_peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
