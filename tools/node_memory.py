"""Where the DICOM node's memory goes while it makes a result (#19: budget 80 MB).

``tools/bench_dicom.py`` gives the node's peak RSS; this says which step sets it and whether
the megabytes are anonymous (the process's own heap) or file-backed (clean pages of shared
libraries). In one process, it imports what ``ctpi dicom`` imports, then runs the steps of
:meth:`device.node.outbox.Outbox.top_slice_rgb` and of ``make_results``'s Secondary Capture
on one synthetic 512x512 CT slice, ``--rounds`` times. Since #19 the node loads no model: the
watch daemon stores the top slice's coarse occlusion map in the journal and the node smooths
and draws it; here a child process (which loads the model, so this one never does) writes the
slice, its journal record and its map, as the watch daemon would. Each line: RSS after the
step, the peak during it (VmHWM, reset before each step through ``/proc/self/clear_refs``;
Linux only), and the anonymous / file-backed split of RSS (``/proc/self/smaps_rollup``). The
last line says whether LiteRT was imported (it must not be).

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


# The watch daemon's part, in a child process: the slice as a stored file, its record and its
# map in a journal (the model is loaded there, never in the measured process).
WATCH_DAEMON = """
import sys, time
from pathlib import Path
from device.core.classifier import Classifier
from device.core.heatmap import occlusion_map
from device.core.preprocess import decode_slice, prepare
from device.watch.journal import Journal, SliceResult
from tests.dicomtools import write_series
state, model = Path(sys.argv[1]), Path(sys.argv[2])
(source,) = write_series(state / "series", 1, label="COVID")
journal = Journal.open(state)
(recorded,) = journal.record([SliceResult("study-x/a.dcm", None, None, "ok", time.time(), label="COVID", positive=True,
                                          positive_probability=0.9, threshold=0.5)], "COVID", "NonCOVID")
(state / recorded.stored_as).parent.mkdir(parents=True)
source.rename(state / recorded.stored_as)
classifier = Classifier(model, None, 1, guard=False)
spec = classifier.bundle.spec
heatmap = occlusion_map(classifier, prepare(decode_slice(state / recorded.stored_as, spec).pixels, spec))
journal.record_heatmap(recorded.id, time.time(), grid=7, coarse=heatmap.coarse, base_probability=heatmap.base_probability)
journal.close()
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "mobilenetv2")
    parser.add_argument("--rounds", type=int, default=3, help="results made one after the other (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctpi-node-memory-") as folder:
        import subprocess

        subprocess.run([sys.executable, "-c", WATCH_DAEMON, folder, str(args.model)], check=True, cwd=REPO)
        state = Path(folder)
        Path("/proc/self/clear_refs").write_text("5")
        mark("interpreter")
        from device.core.dicom import import_pydicom_lean
        from device.core.memory import one_malloc_arena, release_memory

        import_pydicom_lean()
        one_malloc_arena()
        import pynetdicom  # noqa: F401

        import device.node.daemon  # noqa: F401

        mark("node imports")
        import pydicom

        from device.core.bundle import load_bundle
        from device.core.heatmap import overlay, sensitivity_map
        from device.core.preprocess import decode_slice, prepare
        from device.node.report import build_sc, encode
        from device.watch.journal import Journal

        bundle = load_bundle(args.model, verify=False)
        journal = Journal.open_readonly(state)
        (slice_id, stored_as), = journal._db.execute("SELECT id, stored_as FROM slices").fetchall()
        path = state / stored_as
        source = pydicom.dcmread(path, stop_before_pixels=True)
        mark("result imports")
        for round_number in range(1, args.rounds + 1):
            print(f"-- result {round_number}")
            stored = journal.heatmap(slice_id)
            mark("journal's heatmap read")
            decoded = decode_slice(path, bundle.spec)
            pixels = prepare(decoded.pixels, bundle.spec)
            del decoded
            mark("decode + prepare")
            rgb = overlay(pixels, sensitivity_map(stored["coarse"], pixels.shape[:2]))
            mark("smooth + overlay")
            data = encode(build_sc(source, rgb, {"label": "COVID", "probability": 0.9}, {"name": bundle.name}))
            mark("secondary capture")
            del data, rgb, pixels, stored
            release_memory()
            mark("end of result")
        journal.close()
        litert = sorted(name for name in sys.modules if name.split(".")[0] in ("ai_edge_litert", "tflite_runtime"))
        print(f"LiteRT modules imported: {litert or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
