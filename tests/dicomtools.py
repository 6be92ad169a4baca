"""Synthetic CT series for the DICOM node tests and benchmark: real Part-10 files, fake patients.

Slices are 16-bit CT Image Storage (Hounsfield units via rescale) of the chest phantom of
:mod:`device.core.phantom`, which the shipped bundles' input guard accepts, so the verdict path is
exercised with readable slices; ``COVID`` series carry ground-glass opacities. Patient fields carry a marker
(:data:`PATIENT_NAME`, :data:`PATIENT_ID`) that the tests search for in logs, journal and page.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import numpy as np

from device.core.phantom import FRAME, chest_hounsfield
from tests.synthetic import NEGATIVE, POSITIVE
from tests.watchtools import wait_for

PATIENT_NAME = "Doe^Jane-SECRET-4711"
PATIENT_ID = "PID-SECRET-4711"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DISTINCT_SLICES = 16  # a series cycles through this many phantoms (drawing one takes tens of ms)


@functools.lru_cache(maxsize=64)
def ct_pixels(label: str, seed: int, size: int = 512) -> np.ndarray:
    """An int16 slice in HU, ``size`` columns wide and framed like the phantom (rows about 0.8 x
    columns): a chest at heart level, with ground glass in the lungs for ``COVID``."""
    rows = max(1, round(size * FRAME[0] / FRAME[1]))
    pixels = chest_hounsfield(rows, size, seed=seed, ground_glass=label == POSITIVE)
    pixels.flags.writeable = False
    return pixels


def write_series(folder: Path, count: int, study_uid: str | None = None, label: str = NEGATIVE, size: int = 512,
                 patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID, seed: int = 0,
                 sop_class: str = CT_IMAGE_STORAGE) -> list[Path]:
    """``count`` instances of one series of one study as ``folder/NNNN.dcm``; returns the paths."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for index in range(count):
        pixels = ct_pixels(label, seed * 10000 + index % DISTINCT_SLICES, size)
        dataset = Dataset()
        dataset.SOPClassUID = sop_class
        dataset.SOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.PatientName, dataset.PatientID = patient_name, patient_id
        dataset.PatientBirthDate, dataset.PatientSex = "19700101", "F"
        dataset.StudyDate, dataset.StudyTime, dataset.StudyID, dataset.AccessionNumber = "20240101", "120000", "1", "ACC-SECRET"
        dataset.ReferringPhysicianName = ""
        dataset.Modality, dataset.SeriesNumber, dataset.InstanceNumber = "CT", 1, index + 1
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
        dataset.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, dataset.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta = meta
        path = folder / f"{index:04d}.dcm"
        try:
            dataset.save_as(path, enforce_file_format=True)
        except TypeError:  # pydicom 2.x
            dataset.is_little_endian, dataset.is_implicit_VR = True, False
            dataset.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


class Orthanc:
    """Orthanc on free ports with a config written here; its only known modality is ctpi on
    127.0.0.1, its HTTP API refuses remote clients, and it is killed when the test ends."""

    def __init__(self, tmp: Path, ctpi_port: int):
        self.http, self.dicom = free_port(), free_port()
        self.folder = tmp / "orthanc"
        self.folder.mkdir()
        config = {
            "Name": "ctpi-test", "DicomAet": "ORTHANC", "DicomPort": self.dicom, "HttpPort": self.http,
            "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
            "DicomModalities": {"ctpi": ["CTPI", "127.0.0.1", ctpi_port]},
            "HttpsVerifyPeers": False, "StableAge": 3600, "ConcurrentJobs": 1,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = self.folder / "orthanc.log"
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=open(self.log, "wb"),
                                        stderr=subprocess.STDOUT)
        wait_for(self.ready, 60, interval=0.2, what="Orthanc")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            return self.get("/system") is not None
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as response:
            return json.loads(response.read()) if "json" in response.headers.get("Content-Type", "") else response.read()

    def post(self, path: str, data: bytes, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


__all__ = ["POSITIVE", "NEGATIVE", "free_port", "write_series", "PATIENT_NAME", "PATIENT_ID"]
