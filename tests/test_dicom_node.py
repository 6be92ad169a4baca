"""``ctpi dicom`` against real peers: DCMTK's echoscu/storescu as the scanner, Orthanc as the
PACS, the real watch daemon with the shipped int8 model, real kill -9. Nothing but 127.0.0.1."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from device.config import ConfigError, load_config  # noqa: E402
from device.node.report import build_sr, encode  # noqa: E402
from device.node.scp import instance_hash, study_folder  # noqa: E402
from tests.dicomtools import ORTHANC, PATIENT_ID, PATIENT_NAME, Orthanc, free_port, write_series  # noqa: E402
from tests.watchtools import wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "mobilenetv2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed (Debian: dcmtk; make system-deps)")
MARKERS = ("SECRET", PATIENT_ID)


class Node:
    """A ``ctpi dicom`` process on a free loopback port; killed if a test fails."""

    def __init__(self, tmp: Path, allow=("STORESCU", "SCU"), send_to: str = "", stable_seconds: float = 60.0, heatmap=False):
        self.tmp, self.inbox, self.state = tmp, tmp / "inbox", tmp / "state"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = tmp / "node.log"
        self.args = [sys.executable, "-m", "device.cli", "dicom", "--aet", "CTPI", "--port", str(self.port),
                     "--inbox", str(self.inbox), "--state", str(self.state), "--model", str(MODEL),
                     "--stable-seconds", str(stable_seconds), "--config", str(tmp / "none.toml")]
        (tmp / "none.toml").write_text("")
        for entry in allow:
            self.args += ["--allow", entry]
        if send_to:
            self.args += ["--send-to", send_to]
        if not heatmap:
            self.args.append("--no-heatmap")
        self.process = None

    def start(self) -> Node:
        """Start (or restart: the log is appended to, so wait for one more "listening on")."""
        started = self.log.read_bytes().count(b"listening on") if self.log.exists() else 0
        self.process = subprocess.Popen(self.args, cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.log.read_bytes().count(b"listening on") > started or self.process.poll() is not None, 30, what="node start")
        assert self.process.poll() is None, self.log.read_text()
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def ledger(self, sql: str, args=()) -> list:
        with sqlite3.connect(self.state / "dicom" / "node.sqlite") as db:
            return db.execute(sql, args).fetchall()

    def stored(self) -> list[Path]:
        return sorted(p for p in self.inbox.rglob("*.dcm") if not p.name.startswith("."))


@pytest.fixture
def node_factory(tmp_path):
    nodes = []

    def make(**kwargs) -> Node:
        node = Node(tmp_path, **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop(signal.SIGKILL)


def watch_once(node: Node) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "device.cli", "watch", "--once", "--inbox", str(node.inbox), "--state", str(node.state),
         "--model", str(MODEL), "--settle-seconds", "0", "--config", str(node.tmp / "none.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def journal_paths(node: Node) -> list[str]:
    with sqlite3.connect(node.state / "journal.sqlite") as db:
        return [row[0] for row in db.execute("SELECT path FROM slices")]


def journal_refusals(node: Node) -> list[tuple[str, str]]:
    """(path, reason) of every slice the daemon did not score: the phantom series are chest CT
    slices the shipped bundle's guard accepts, so the verdict path is the one exercised."""
    with sqlite3.connect(node.state / "journal.sqlite") as db:
        return db.execute("SELECT path, reason FROM slices WHERE status != 'ok'").fetchall()


def scu(*args: str, port: int, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    """echoscu/storescu ``args[0]`` from ``aet`` to the node; ``args[1:]`` are files to send."""
    return subprocess.run([args[0], "-aec", "CTPI", "-aet", aet, "127.0.0.1", str(port), *args[1:]],
                          capture_output=True, text=True, timeout=120)


# -- configuration and the SR (no network) ---------------------------------------------------------


def test_dicom_section_is_read_and_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "ctpi.toml"
    path.write_text('[dicom]\naet = "NODE"\nport = 4242\nallow = ["PACS@10.0.0.5", "CT1"]\nsend_to = "PACS@10.0.0.5:104"\nstable_seconds = 5\n')
    config = load_config(path).dicom
    assert (config.aet, config.port, config.allow, config.stable_seconds) == ("NODE", 4242, ("PACS@10.0.0.5", "CT1"), 5.0)
    path.write_text('[dicom]\nstable_secs = 5\n')
    with pytest.raises(ConfigError, match="stable_secs"):
        load_config(path)


def test_sr_carries_every_verdict_field_including_new_ones(tmp_path):
    """The SR reads the verdict generically: a "review" label and uncertain counts flow through."""
    import pydicom

    source = pydicom.dcmread(write_series(tmp_path / "s", 1, size=32)[0], stop_before_pixels=True)
    verdict = {"name": "study-x", "label": "review", "probability": 0.51, "slices": 12, "rejected": 1,
               "positive_slices": 2, "uncertain_slices": 3, "threshold": 0.5, "rule": "max", "top_slice_id": 4}
    sr = build_sr(source, verdict, {"name": "mobilenetv2", "version": "1", "sha256": "ab" * 32})
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    assert items["Verdict"].TextValue == "review"
    assert items["Uncertain slices"].MeasuredValueSequence[0].NumericValue == "3"
    assert "not a diagnosis" in sr.ContentSequence[0].TextValue
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == PATIENT_ID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    if shutil.which("dsrdump"):
        result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
        assert result.returncode == 0 and "Uncertain slices" in result.stdout, result.stdout + result.stderr


def test_secondary_capture_draws_the_journals_heatmap_as_the_page_computes_it(tmp_path):
    """The Secondary Capture's image is the occlusion map of the bundle's own TFLite model over
    the top slice, exactly as the page computes it (``occlusion_map``), drawn by the node from
    the coarse grid the watch daemon keeps in the journal (#19: the node loads no model); with
    no map in the journal, or the heatmap off, it is the plain slice."""
    import numpy as np

    from device.config import DicomConfig
    from device.core.classifier import Classifier
    from device.core.heatmap import occlusion_map, overlay
    from device.core.preprocess import decode_slice, prepare
    from device.node.daemon import Node
    from device.watch.journal import Journal, SliceResult

    (inbox := tmp_path / "inbox").mkdir()
    (state := tmp_path / "state").mkdir()
    source = write_series(tmp_path / "series", 1, size=128, label="COVID")[0]
    journal = Journal.open(state)
    scored = SliceResult("study-x/a.dcm", None, None, "ok", time.time(), label="COVID", positive=True, positive_probability=0.9, threshold=0.5)
    (recorded,) = journal.record([scored], "COVID", "NonCOVID")
    (state / recorded.stored_as).parent.mkdir(parents=True)
    shutil.copy(source, state / recorded.stored_as)
    verdict = {"top_slice_id": recorded.id}
    node = Node(DicomConfig(heatmap=True), inbox, state, MODEL)
    grey = node.top_slice_rgb(verdict)  # no map made yet
    assert (grey[..., 0] == grey[..., 2]).all() and (grey[..., 1] == grey[..., 2]).all()

    classifier = Classifier(MODEL, None, 1)
    pixels = prepare(decode_slice(source, classifier.bundle.spec).pixels, classifier.bundle.spec)
    heatmap = occlusion_map(classifier, pixels)
    journal.record_heatmap(recorded.id, time.time(), grid=7, coarse=heatmap.coarse, base_probability=heatmap.base_probability)
    journal.close()
    shown = node.top_slice_rgb(verdict)
    expected = overlay(pixels, heatmap.sensitivity)
    assert shown.shape == (224, 224, 3) and np.array_equal(shown, expected)
    assert (shown[..., 0] != shown[..., 2]).any()  # coloured: the map is drawn, not only the grey slice
    plain = Node(DicomConfig(heatmap=False), inbox, state, MODEL).top_slice_rgb(verdict)
    assert (plain[..., 0] == plain[..., 2]).all() and (plain[..., 1] == plain[..., 2]).all()


def test_occlusion_one_copy_at_a_time_is_the_batch_map():
    """The node's occlusion map (one occluded copy in memory at a time) has the values of the
    batch of :func:`occluded_copies` through the same model, to the bit."""
    import numpy as np

    from device.core.classifier import Classifier
    from device.core.heatmap import occluded_copies, occlusion_map

    classifier = Classifier(MODEL, None, 1)
    pixels = np.random.default_rng(3).integers(0, 256, (224, 224, 1), dtype=np.uint8)
    positive = classifier.bundle.positive_index
    base = float(classifier.probabilities(pixels)[positive])
    batch = (base - classifier.probabilities_batch(occluded_copies(pixels, 7))[:, positive]).reshape(7, 7).astype(np.float32)
    assert np.array_equal(occlusion_map(classifier, pixels, 7).coarse, batch)


def test_stored_file_is_the_received_bytes_behind_pynetdicoms_own_file_meta():
    """The node writes the peer's encoded dataset behind a Part 10 header it encodes itself
    (no decode, no re-encode); that header must be the one pynetdicom would have written."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from device.node.store import part10_header

    for sop_class, syntax in (("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian), ("1.2.840.10008.5.1.4.1.1.2.1", ImplicitVRLittleEndian),
                              ("1.2.840.10008.5.1.4.1.1.2", JPEG2000Lossless)):
        for instance in (generate_uid(), "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"):  # odd, even: UI padding
            expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(sop_class_uid=sop_class, sop_instance_uid=instance, transfer_syntax=syntax))
            assert part10_header(sop_class, instance, syntax) == expected


# -- DCMTK as the scanner -------------------------------------------------------------------------------


@pytest.mark.system
@needs_dcmtk
def test_echo_allow_list_and_refused_sop_classes(node_factory, tmp_path):
    node = node_factory(allow=("STORESCU", "SCU@10.9.9.9")).start()
    assert scu("echoscu", port=node.port).returncode == 0
    assert scu("echoscu", port=node.port, aet="INTRUDER").returncode != 0
    assert scu("echoscu", port=node.port, aet="SCU").returncode != 0  # right title, wrong address
    secondary = write_series(tmp_path / "sc", 2, size=32, sop_class=SECONDARY_CAPTURE)
    result = scu("storescu", *map(str, secondary), port=node.port)
    assert result.returncode != 0  # no presentation context for Secondary Capture
    assert node.stored() == []
    reasons = [row[0] for row in node.ledger("SELECT reason FROM refusals")]
    assert reasons.count("not-allowed") == 2
    assert scu("echoscu", port=node.port).returncode == 0  # and it keeps serving


@pytest.mark.system
@needs_dcmtk
def test_storescu_studies_abort_and_resend_are_stored_once(node_factory, tmp_path):
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    node = node_factory().start()
    first = write_series(tmp_path / "a", 6, size=64, seed=1)
    second = write_series(tmp_path / "b", 4, size=64, seed=2)
    result = scu("storescu", *map(str, first + second), port=node.port)  # two studies, one association
    assert result.returncode == 0, result.stderr
    stored = node.stored()
    assert len(stored) == 10 and len({p.parent.name for p in stored}) == 2
    assert all(p.parent.name.startswith("study-") and "." not in p.stem for p in stored)  # hashes, no UIDs

    assert scu("storescu", *map(str, first), port=node.port).returncode == 0  # resend: acknowledged, not stored again
    assert len(node.stored()) == 10
    assert node.ledger("SELECT value FROM counters WHERE name = 'instances_duplicate'") == [(6,)]

    # an association aborted mid-study keeps what was acknowledged; a broken dataset is refused
    import pydicom

    third = write_series(tmp_path / "c", 3, size=64, seed=3, study_uid=generate_uid())
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTPI")
    assert assoc.is_established
    for path in third[:2]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    broken = pydicom.dcmread(third[2])
    broken.PixelData = broken.PixelData[:100]
    assert assoc.send_c_store(broken).Status == 0xC000
    assoc.abort()
    assert len(node.stored()) == 12
    assert scu("echoscu", port=node.port).returncode == 0
    assert [row[0] for row in node.ledger("SELECT reason FROM refusals")] == ["broken"]
    watch_once(node)
    assert len(journal_paths(node)) == 12 and not node.stored()  # each triaged once, inbox emptied
    assert journal_refusals(node) == []  # and scored: the guard took them for chest CT
    status = subprocess.run([sys.executable, "-m", "device.cli", "status", "--state", str(node.state)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert "12 instances received (6 resent), 1 refused" in status.stdout, status.stdout + status.stderr
    for text in (node.log.read_bytes(), (node.state / "journal.sqlite").read_bytes(), (node.state / "dicom" / "node.sqlite").read_bytes()):
        assert not any(marker.encode() in text for marker in MARKERS)


@pytest.mark.system
@pytest.mark.slow
@needs_dcmtk
def test_killed_node_loses_no_acknowledged_instance(node_factory, tmp_path):
    """kill -9 while storescu sends 200 instances: every acknowledged one is triaged exactly
    once after the restart, and resending the whole series adds only the missing ones."""
    files = write_series(tmp_path / "series", 200, size=64)
    node = node_factory().start()
    sender = subprocess.Popen(["storescu", "-v", "-aec", "CTPI", "-aet", "STORESCU", "127.0.0.1", str(node.port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(node.stored()) >= 40, 60, interval=0.005, what="40 instances stored")
    node.process.send_signal(signal.SIGKILL)
    node.process.wait()
    output = sender.communicate(timeout=60)[0]
    acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
    # storescu sends the next instance only after the last one's response, so at most one stored
    # instance can lack its response: the kill may land between its rename and the response
    assert 39 <= acknowledged < 200, output[-1000:]
    names = [instance_hash(str(__import__("pydicom").dcmread(f, stop_before_pixels=True).SOPInstanceUID))[:32] + ".dcm" for f in files]

    node.start()  # recovery: committed temporaries renamed, the rest deleted
    assert not list(node.inbox.rglob(".*.tmp"))
    watch_once(node)
    triaged = [Path(p).name for p in journal_paths(node)]
    for name in names[:acknowledged]:
        assert triaged.count(name) == 1, name
    assert scu("storescu", *map(str, files), port=node.port).returncode == 0
    watch_once(node)
    triaged = [Path(p).name for p in journal_paths(node)]
    assert sorted(triaged) == sorted(names)  # all 200, each exactly once
    assert journal_refusals(node) == []


def test_an_acknowledged_instance_whose_rename_was_lost_is_renamed_at_restart(node_factory, tmp_path):
    """*Success* is answered once the temporary file is fsynced and its ledger row committed; the
    folder fsync that makes the final name durable is batched (device.node.store). A power cut
    before it leaves the temporary file: the restart renames it before the port opens, deletes a
    temporary file that has no row, and a resend stores nothing twice."""
    import pydicom
    from pynetdicom import AE

    files = write_series(tmp_path / "series", 3, size=64)

    def send(port: int) -> list[int]:
        ae = AE(ae_title="SCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CTPI")
        assert assoc.is_established
        try:
            return [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files]
        finally:
            assoc.release()

    node = node_factory().start()
    assert send(node.port) == [0, 0, 0]
    node.stop()
    stored = node.stored()
    assert len(stored) == 3
    lost = stored[0]
    lost.rename(lost.parent / f".{lost.name}.tmp")  # what a power cut before the folder fsync can leave
    stray = lost.parent / ".0123456789abcdef.dcm.tmp"
    stray.write_bytes(b"half an instance nobody was told about")  # no ledger row
    node.start()
    assert node.stored() == stored and not list(node.inbox.rglob(".*.tmp"))
    assert "recovery: 1 acknowledged instances moved into the inbox" in node.log.read_text()
    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert str(pydicom.dcmread(lost).SOPInstanceUID) in sent  # whole, and a DICOM file
    assert send(node.port) == [0, 0, 0]
    assert node.stored() == stored
    assert node.ledger("SELECT value FROM counters WHERE name = 'instances_duplicate'") == [(3,)]


# -- Orthanc as the PACS ------------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.slow
@needs_dcmtk
@pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (Debian: orthanc; make system-deps)")
def test_orthanc_pushes_a_study_and_gets_the_sr_and_secondary_capture_back(node_factory, tmp_path):
    import pydicom

    node = node_factory(allow=("ORTHANC@127.0.0.1",), stable_seconds=2.0, heatmap=True)
    orthanc = Orthanc(tmp_path, node.port)
    try:
        node.args += ["--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}"]
        node.start()
        watch = subprocess.Popen(
            [sys.executable, "-m", "device.cli", "watch", "--inbox", str(node.inbox), "--state", str(node.state), "--model",
             str(MODEL), "--settle-seconds", "0.2", "--config", str(node.tmp / "none.toml")],
            cwd=REPO, stdout=open(tmp_path / "watch.log", "wb"), stderr=subprocess.STDOUT,
        )
        try:
            files = write_series(tmp_path / "series", 12, size=128, label="COVID")
            for path in files:
                orthanc.post("/instances", path.read_bytes(), "application/dicom")
            (study,) = orthanc.get("/studies")
            study_uid = orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            job = orthanc.post("/modalities/ctpi/store", json.dumps({"Resources": [study], "Synchronous": True}).encode())
            assert job.get("FailedInstancesCount", 0) == 0, job
            pushed_at = time.monotonic()
            # what the node took (its ledger: the watch daemon may already have moved some out of the inbox)
            assert node.ledger("SELECT study, COUNT(*) FROM instances GROUP BY study") == [(study_folder(study_uid), 12)]

            def series_back():
                series = orthanc.get(f"/studies/{study}/series")
                return series if len(series) == 3 else None

            series = wait_for(series_back, 90, interval=0.5, what="the SR and Secondary Capture in Orthanc")
            latency = time.monotonic() - pushed_at
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.wait(timeout=30)
        modalities = {s["MainDicomTags"]["Modality"]: s for s in series}
        assert set(modalities) == {"CT", "SR", "OT"}
        sr_instance = modalities["SR"]["Instances"][0]
        sr_bytes = orthanc.get(f"/instances/{sr_instance}/file")
        (tmp_path / "sr.dcm").write_bytes(sr_bytes)
        dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
        assert dump.returncode == 0 and "not a diagnosis" not in dump.stderr, dump.stderr
        (tmp_path / "dsrdump.txt").write_text(dump.stdout)
        sr = pydicom.dcmread(io.BytesIO(sr_bytes))
        assert sr.PatientName == PATIENT_NAME and sr.StudyInstanceUID == study_uid
        findings = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
        assert findings["Verdict"].TextValue in ("COVID", "NonCOVID", "review"), findings["Verdict"]
        assert journal_refusals(node) == []  # a verdict on 12 scored slices, not on refusals
        sc = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{modalities['OT']['Instances'][0]}/file")))
        assert sc.BurnedInAnnotation == "YES" and sc.SamplesPerPixel == 3
        assert node.ledger("SELECT state, calling_aet FROM studies") == [("sent", "ORTHANC")]
        # the heatmap is the watch daemon's, and the node never mapped LiteRT (#19)
        with sqlite3.connect(node.state / "journal.sqlite") as db:
            assert db.execute("SELECT count(*) FROM heatmaps h JOIN studies s ON s.top_slice_id = h.slice_id"
                              " WHERE h.coarse IS NOT NULL").fetchone() == (1,)
        assert b"without heatmap" not in node.log.read_bytes()
        maps = Path(f"/proc/{node.process.pid}/maps")
        if maps.exists():
            assert not re.search(r"litert|LiteRt|tflite|tensorflow", maps.read_text()), "the node loaded LiteRT"
        print(f"verdict and SR in Orthanc {latency:.1f} s after the push (stable_seconds 2)")
        for text in (node.log.read_bytes(), (tmp_path / "watch.log").read_bytes(), (node.state / "journal.sqlite").read_bytes()):
            assert not any(marker.encode() in text for marker in MARKERS)
    finally:
        node.stop()
        orthanc.stop()


ARENAS = """
import ctypes, os, tempfile, threading
if {one}:
    from device.core.memory import one_malloc_arena
    one_malloc_arena()
def work():
    blocks = [bytearray(200_000) for _ in range(20)]
thread = threading.Thread(target=work)
thread.start()
thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.implementation.name != "cpython", reason="glibc's malloc")
def test_the_node_keeps_its_threads_in_one_malloc_arena():
    """#19: pynetdicom's association threads each got a glibc arena of their own, which kept the
    node's peak growing study after study; ``one_malloc_arena`` (called by the node) stops that."""
    counts = {}
    for one in (False, True):
        result = subprocess.run([sys.executable, "-c", ARENAS.format(one=one)], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1], timeout=60)
        assert result.returncode == 0, result.stderr
        counts[one] = int(result.stdout)
    if counts[False] == 1:
        pytest.skip("this libc gave the thread no arena of its own")
    assert counts[True] == 1
