"""Benchmark of the DICOM node: receive throughput, result latency, memory.

Starts Orthanc (loopback, free ports, config in a temporary folder), ``ctpi dicom`` sending
to it and ``ctpi watch``, then sends one synthetic study of ``--slices`` 512x512 16-bit CT
instances with DCMTK's ``storescu`` (one association, over loopback) and prints:

- receive throughput: instances / storescu's wall time (each acknowledged only once on disk);
- result latency: from the last instance acknowledged to the SR and the Secondary Capture
  being in Orthanc under the study (target: ``stable_seconds`` + 5 s; the watch daemon's
  triage backlog is part of it);
- the node's RSS after receiving and its peak (``VmHWM``: includes drawing the heatmap, which
  since #19 the watch daemon makes, so the node loads no model), and the watch daemon's peak (it
  decodes the study's DICOM files and makes the top slice's occlusion map when idle);
- with ``--studies N``, the same study size sent N times one after the other (each waited for):
  the node's peak after the first study and over all of them;
- how many Secondary Captures went out without their heatmap (the node's log says why).

Targets (#19, 2-core machine, int8 bundle): >= 100 instances/s, <= stable + 5 s, <= 80 MB.

    python tools/bench_dicom.py --slices 300 --stable-seconds 5
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dicomtools import ORTHANC, Orthanc, free_port, write_series  # noqa: E402
from tests.watchtools import wait_for  # noqa: E402


def memory_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--stable-seconds", type=float, default=5.0)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "mobilenetv2")
    parser.add_argument("--studies", type=int, default=1, help="studies sent one after the other (default 1)")
    parser.add_argument("--no-heatmap", action="store_true", help="no heatmap: the node's --no-heatmap, [watch] study_heatmaps = false")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if ORTHANC is None:
        print("bench_dicom: needs Orthanc and DCMTK (Debian: orthanc dcmtk; make system-deps)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctpi-bench-dicom-") as folder:
        tmp = Path(folder)
        inbox, state = tmp / "inbox", tmp / "state"
        inbox.mkdir()
        state.mkdir()
        # --no-heatmap: none anywhere (the node draws none, the watch daemon makes none)
        (tmp / "none.toml").write_text("[watch]\nstudy_heatmaps = false\n" if args.no_heatmap else "")
        studies = [write_series(tmp / f"series{n}", args.slices, label="COVID", seed=n) for n in range(args.studies)]
        port = free_port()
        orthanc = Orthanc(tmp, port)
        processes = []
        try:
            common = ["--inbox", str(inbox), "--state", str(state), "--model", str(args.model), "--config", str(tmp / "none.toml")]
            node_log = tmp / "node.log"
            node = subprocess.Popen(
                [sys.executable, "-m", "device.cli", "dicom", "--port", str(port), "--allow", "STORESCU", "--send-to",
                 f"ORTHANC@127.0.0.1:{orthanc.dicom}", "--stable-seconds", str(args.stable_seconds), *common]
                + (["--no-heatmap"] if args.no_heatmap else []),
                cwd=REPO, stdout=open(node_log, "wb"), stderr=subprocess.STDOUT,
            )
            processes.append(node)
            watch = subprocess.Popen([sys.executable, "-m", "device.cli", "watch", "--settle-seconds", "0.2", *common],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(watch)
            wait_for(lambda: b"listening on" in node_log.read_bytes(), 60, what="the node")
            peaks = []
            for number, files in enumerate(studies, 1):
                start = time.monotonic()
                result = subprocess.run(["storescu", "-aec", "CTPI", "-aet", "STORESCU", "127.0.0.1", str(port), *map(str, files)],
                                        capture_output=True, text=True)
                received = time.monotonic()
                if result.returncode != 0:
                    print(result.stderr, file=sys.stderr)
                    return 1
                if number == 1:
                    rss_received, _ = memory_mb(node.pid)
                    first = (start, received)

                def results_in_orthanc(count=number):
                    answered = 0
                    for study in orthanc.get("/studies"):
                        modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study}/series")}
                        answered += {"SR", "OT"} <= modalities
                    return answered >= count

                wait_for(results_in_orthanc, 600, interval=0.2, what="the SR and Secondary Capture in Orthanc")
                if number == 1:
                    done = time.monotonic()
                peaks.append(memory_mb(node.pid)[1])
            start, received = first
            rss, peak = memory_mb(node.pid)
            watch_peak = memory_mb(watch.pid)[1]
            without_heatmap = node_log.read_bytes().count(b"without heatmap")
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            orthanc.stop()
    figures = {
        "slices": args.slices,
        "studies": args.studies,
        "instance_mb": round(512 * 512 * 2 / 1e6, 3),
        "receive_seconds": round(received - start, 2),
        "receive_instances_per_second": round(args.slices / (received - start), 1),
        "stable_seconds": args.stable_seconds,
        "result_latency_seconds": round(done - received, 2),
        "result_latency_beyond_stable_seconds": round(done - received - args.stable_seconds, 2),
        "node_rss_mb_after_receive": round(rss_received, 1),
        "node_rss_mb_end": round(rss, 1),
        "node_peak_rss_mb_first_study": round(peaks[0], 1),
        "node_peak_rss_mb_each_study": [round(value, 1) for value in peaks],
        "node_peak_rss_mb": round(peak, 1),
        "watch_peak_rss_mb": round(watch_peak, 1),
        "heatmap": not args.no_heatmap,
        "results_without_heatmap": without_heatmap,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
