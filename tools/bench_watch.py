"""Benchmark of the watch daemon against ``ctpi bench``, measured in the same run.

Drops ``--slices`` chest CT phantom PNG slices into a running ``ctpi watch`` and prints its
throughput next to the throughput implied by ``ctpi bench``'s end-to-end figure (read +
decode + preprocess + invoke of a PNG on disk, one stream) for the same bundle and threads,
their ratio (target >= 0.8: journaling, hashing and moving files must cost little) and the
daemon's peak RSS (target <= 80 MB with the MobileNetV2 int8 bundle).

Daemon throughput = slices / (last commit - (first file noticed + settle time)): the whole
pipeline, including SQLite commits, fsyncs and moves, but not the deliberate settle wait.
Each round measures ``ctpi bench`` and then the daemon; the median ratio of ``--repeat``
rounds is reported, because a shared machine's load swings single figures widely.

    python tools/bench_watch.py --model models/mobilenetv2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = 512


def write_slices(folder: Path, count: int) -> list[Path]:
    """Chest CT phantom slices (``device.core.phantom``, which the input guard accepts, so the
    daemon scores them rather than refusing them), 16 anatomies, each file made distinct by
    two corner pixels."""
    import io

    sys.path.insert(0, str(REPO))
    from device.core.phantom import chest_png

    anatomies = [np.asarray(Image.open(io.BytesIO(chest_png(seed=seed, ground_glass=bool(seed % 2))))) for seed in range(16)]
    paths = []
    for index in range(count):
        image = anatomies[index % len(anatomies)].copy()
        image[0, 0], image[0, 1] = index % 256, index // 256
        path = folder / f"slice_{index:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def ctpi_bench(model: str, fmt: str | None, threads: int, runs: int) -> dict:
    command = [sys.executable, "-m", "device.cli", "bench", "--json", "--model", model, "--threads", str(threads), "--runs", str(runs)]
    if fmt:
        command += ["--format", fmt]
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    (result,) = json.loads(output)["results"]
    if "error" in result:
        raise SystemExit(f"ctpi bench failed: {result['error']}")
    return result


def peak_rss_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024.0


def run_daemon(model: str, fmt: str | None, threads: int, slices: int, settle: float, scratch: Path) -> dict:
    inbox, state, staging = scratch / "inbox", scratch / "state", scratch / "staging"
    for folder in (inbox, state, staging):
        folder.mkdir()
    print(f"writing {slices} chest phantom PNGs ...", file=sys.stderr, flush=True)
    files = write_slices(staging, slices)
    notify_path = str(scratch / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(120)
    command = [sys.executable, "-m", "device.cli", "watch", "--inbox", str(inbox), "--state", str(state), "--model", model,
               "--threads", str(threads), "--settle-seconds", str(settle)]
    if fmt:
        command += ["--format", fmt]
    log = open(scratch / "daemon.log", "wb")
    daemon = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, NOTIFY_SOCKET=notify_path), stdout=log, stderr=log)
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        print(f"daemon ready (pid {daemon.pid}); dropping {slices} slices", file=sys.stderr, flush=True)
        for path in files:
            os.rename(path, inbox / path.name)
        journal = sqlite3.connect(f"{(state / 'journal.sqlite').as_uri()}?mode=ro", uri=True)
        deadline = time.monotonic() + 3600
        while journal.execute("SELECT count(*) FROM slices").fetchone()[0] < slices:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon stopped early; see {scratch / 'daemon.log'}")
            time.sleep(0.2)
        first_seen, last_commit, ok = journal.execute(
            "SELECT min(seen_at), max(recorded_at), sum(status = 'ok') FROM slices"
        ).fetchone()
        journal.close()
        peak = peak_rss_mb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
        notify.close()
    elapsed = last_commit - (first_seen + settle)
    return {"slices": slices, "ok": ok, "seconds": elapsed, "throughput_per_s": slices / elapsed, "peak_rss_mb": peak,
            "exit_code": daemon.returncode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/mobilenetv2", help="bundle folder (default models/mobilenetv2)")
    parser.add_argument("--format", dest="fmt", default=None, help="model format (default: the bundle's default, int8)")
    parser.add_argument("--threads", type=int, default=2, help="inference threads for both measurements (default 2)")
    parser.add_argument("--slices", type=int, default=1000, help="slices dropped into the daemon (default 1000)")
    parser.add_argument("--runs", type=int, default=100, help="ctpi bench runs (default 100)")
    parser.add_argument("--settle", type=float, default=0.5, help="daemon settle time, excluded from its throughput")
    parser.add_argument("--repeat", type=int, default=3, help="paired rounds (bench, then daemon); the median ratio is reported")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "manifest.json").is_file():
        parser.error(f"{args.model} is not a model bundle (make convert builds models/mobilenetv2)")
    pairs = []
    for round_ in range(1, args.repeat + 1):
        print(f"[{round_}/{args.repeat}] ctpi bench ...", file=sys.stderr, flush=True)
        bench = ctpi_bench(args.model, args.fmt, args.threads, args.runs)
        with tempfile.TemporaryDirectory(prefix="ctpi-bench-watch-") as scratch:
            daemon = run_daemon(args.model, args.fmt, args.threads, args.slices, args.settle, Path(scratch))
        implied = 1000.0 / bench["end_to_end_ms"]["mean"]
        pairs.append({"bench_end_to_end_ms": bench["end_to_end_ms"]["mean"], "bench_throughput_per_s": implied,
                      "daemon": daemon, "ratio": daemon["throughput_per_s"] / implied})
    median = sorted(pairs, key=lambda pair: pair["ratio"])[len(pairs) // 2]
    report = {
        "model": bench["model"], "format": bench["format"], "sha256": bench["sha256"], "threads": args.threads,
        "rounds": pairs, "median_ratio": median["ratio"], "peak_rss_mb": max(p["daemon"]["peak_rss_mb"] for p in pairs),
        "rss_target_mb": 80, "ratio_target": 0.8,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model            {report['model']} {report['format']} sha256 {report['sha256'][:16]}…, {args.threads} thread(s)")
    for index, pair in enumerate(pairs, 1):
        daemon = pair["daemon"]
        print(f"round {index}: ctpi bench e2e {pair['bench_end_to_end_ms']:.1f} ms -> {pair['bench_throughput_per_s']:.1f} slices/s;"
              f" ctpi watch {daemon['slices']} slices ({daemon['ok']} ok) in {daemon['seconds']:.1f} s -> "
              f"{daemon['throughput_per_s']:.1f} slices/s; ratio {pair['ratio']:.2f}; peak RSS {daemon['peak_rss_mb']:.1f} MB")
    print(f"ratio            {report['median_ratio']:.2f} (median of {len(pairs)} paired rounds; target >= 0.8)")
    print(f"daemon peak RSS  {report['peak_rss_mb']:.1f} MB (target <= 80 MB with MobileNetV2 int8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
