"""Where the DICOM node's memory goes while it makes a result (#19: budget 80 MB).

``tools/bench_dicom.py`` gives the node's peak RSS; this says which step sets it and whether
the megabytes are anonymous (the process's own heap) or file-backed (clean pages of shared
libraries and of the mapped model, which the watch daemon maps too). In one process, it
imports what ``ctpi dicom`` imports, then runs the steps of
:meth:`device.node.outbox.Outbox.top_slice_rgb` and of ``make_results``'s Secondary Capture
on one synthetic 512x512 CT slice, ``--rounds`` times (LiteRT's libraries stay mapped after
the first round, as in the node). Each line: RSS after the step, the peak during it (VmHWM,
reset before each step through ``/proc/self/clear_refs``; Linux only), and the anonymous /
file-backed split of RSS (``/proc/self/smaps_rollup``).

    python tools/node_memory.py --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _kb(text: str) -> float:
    return int(text.split()[0]) / 1024.0


def mark(step: str) -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        rollup[name] = _kb(value)
    anonymous = rollup["Anonymous"]
    print(f"{step:<26} rss {_kb(status['VmRSS']):5.1f}  peak during {_kb(status['VmHWM']):5.1f}  "
          f"anonymous {anonymous:5.1f}  file {rollup['Rss'] - anonymous:5.1f}  MB", flush=True)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "mobilenetv2")
    parser.add_argument("--rounds", type=int, default=3, help="results made one after the other (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctpi-node-memory-") as folder:
        # the slice is written by a child process, so that making it costs this one nothing
        import subprocess

        code = "import sys; from pathlib import Path; from tests.dicomtools import write_series; write_series(Path(sys.argv[1]), 1, label='COVID')"
        subprocess.run([sys.executable, "-c", code, folder], check=True, cwd=REPO)
        (path,) = Path(folder).glob("*.dcm")
        Path("/proc/self/clear_refs").write_text("5")
        mark("interpreter")
        from device.core.dicom import import_pydicom_lean
        from device.node.outbox import one_malloc_arena, release_memory

        import_pydicom_lean()
        one_malloc_arena()
        import pynetdicom  # noqa: F401

        import device.node.daemon  # noqa: F401

        mark("node imports")
        import pydicom

        from device.core.bundle import load_bundle
        from device.core.classifier import Classifier
        from device.core.heatmap import occlusion_map, overlay
        from device.core.preprocess import decode_slice, prepare
        from device.node.report import build_sc, encode

        source = pydicom.dcmread(path, stop_before_pixels=True)
        mark("result imports")
        for round_number in range(1, args.rounds + 1):
            print(f"-- result {round_number}")
            bundle = load_bundle(args.model)
            pixels = prepare(decode_slice(path, bundle.spec).pixels, bundle.spec)
            release_memory()
            mark("decode + prepare")
            classifier = Classifier(bundle, None, 1, guard=False)
            mark("interpreter built")
            sensitivity = occlusion_map(classifier, pixels).sensitivity
            mark("occlusion map")
            del classifier
            release_memory()
            mark("interpreter dropped")
            rgb = overlay(pixels, sensitivity)
            mark("overlay")
            data = encode(build_sc(source, rgb, {"label": "COVID", "probability": 0.9}, {"name": bundle.name}))
            mark("secondary capture")
            del data, rgb, sensitivity, pixels
            release_memory()
            mark("end of result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
