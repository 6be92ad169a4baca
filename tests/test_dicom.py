"""DICOM slices: Hounsfield units, the lung window, patient fields never logged or recorded."""

from __future__ import annotations

import io
import logging

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
