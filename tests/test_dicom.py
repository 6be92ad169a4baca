"""DICOM slices: Hounsfield units, the lung window, patient fields never logged or recorded."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from device.core import dicom  # noqa: E402
from device.core.preprocess import BadSliceError, decode_slice  # noqa: E402

PATIENT = "Doe^Jane-SECRET-4711"


def ct_small(patient_name: str | None = None) -> bytes:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if patient_name:
        dataset.PatientName = patient_name
        dataset.PatientID = "ID-SECRET-4711"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_dicom_is_recognised_by_content():
    assert dicom.is_dicom(ct_small())
    assert not dicom.is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)


def test_ct_slice_becomes_lung_windowed_hounsfield_units():
    data = ct_small()
    dataset = pydicom.dcmread(io.BytesIO(data))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    pixels, mode = dicom.decode(data)
    # the lung window written out, not read from the code under test: level -600 HU, width 1500 HU,
    # so -1350 HU is black and +150 HU white
    expected = np.clip((hounsfield + 1350.0) * 255.0 / 1500.0, 0, 255)
    assert pixels.shape == dataset.pixel_array.shape and mode.startswith("MONOCHROME2/")
    assert np.allclose(pixels, expected, atol=1e-3)
    assert 0.0 <= pixels.min() and pixels.max() <= 255.0


def test_truncated_dicom_is_rejected_with_a_reason():
    with pytest.raises(BadSliceError) as error:
        decode_slice(ct_small()[:2000])
    assert error.value.reason in ("truncated", "not-an-image")


def test_dicom_patient_fields_never_reach_logs_or_the_journal(tmp_path, tiny_bundle, caplog):
    from device.config import WatchConfig
    from device.watch.daemon import Daemon
    from device.watch.journal import Journal

    inbox, state = tmp_path / "inbox", tmp_path / "state"
    (inbox / "study").mkdir(parents=True)
    (inbox / "study" / "ct.dcm").write_bytes(ct_small(PATIENT))
    config = WatchConfig(inbox=inbox, state=state, model=tiny_bundle, threads=1, settle_seconds=0.1)
    with caplog.at_level(logging.DEBUG):
        assert Daemon(config, once=True).run() == 0
    assert "ct.dcm" in caplog.text and "SECRET" not in caplog.text
    with Journal.open_readonly(state) as reader:
        (record,) = reader.query_slices()
    assert record["status"] == "ok" and record["format"] == "DICOM" and record["study"] == "study"
    journal = (state / "journal.sqlite").read_bytes() + b"".join(p.read_bytes() for p in state.glob("journal.sqlite-*"))
    assert b"SECRET" not in journal


def test_daemons_import_pydicom_lean_and_still_read_every_slice(tmp_path):
    """The daemons' pydicom (#19's 80 MB budget) has neither the test-data downloader's extras
    nor the vendors' private-tag table, and reads a slice with a vendor's private element,
    sent in implicit VR (where only that table knows its VR), to the same pixels and header."""
    import json
    import subprocess
    import sys

    dataset = pydicom.dcmread(io.BytesIO(ct_small()))
    block = dataset.private_block(0x0019, "GEMS_ACQU_01", create=True)  # a vendor pydicom's table names
    block.add_new(0x23, "DS", "1.5")
    dataset.BodyPartExamined = "CHEST"
    path = tmp_path / "private.dcm"
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    pixels, mode, header = dicom.decode_with_header(path.read_bytes(), dicom.LUNG_WINDOW)
    assert pydicom.datadict.private_dictionary_VR(0x00190023, "GEMS_ACQU_01") == "DS"  # this process: the whole table

    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from device.core import dicom\n"
        "pydicom = dicom.import_pydicom_lean()\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "pixels, mode, header = dicom.decode_with_header(data, dicom.LUNG_WINDOW)\n"
        "element = pydicom.dcmread(sys.argv[1])[0x00191023]\n"
        "loaded = sorted(name for name in ('requests', 'tqdm') if name in sys.modules)\n"
        "import requests\n"  # blocked only while pydicom was imported
        "np.save(sys.argv[2], pixels)\n"
        "print(json.dumps({'mode': mode, 'header': header, 'loaded': loaded, 'vr': element.VR,\n"
        "                  'value': bytes(element.value).decode(), 'table': len(pydicom.datadict.private_dictionaries)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "lean.npy")], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    lean = json.loads(done.stdout.splitlines()[-1])
    assert lean["loaded"] == [] and lean["table"] == 0
    assert (lean["vr"], lean["value"].strip()) == ("UN", "1.5")  # still read: bytes, as for a vendor pydicom does not know
    assert lean["mode"] == mode and lean["header"] == json.loads(json.dumps(header))
    assert np.array_equal(np.load(tmp_path / "lean.npy"), pixels)
