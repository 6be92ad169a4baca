"""The result a PACS files with the study: a DICOM Structured Report and a Secondary Capture.

Both are new instances of the *same* study: the patient and study attributes are copied from
a received instance (:data:`IDENTITY`), so the PACS files them next to the images; each is
its own new series with new UIDs, made once per result and kept in the file, so a resend
after a restart is the same instance again, never a second copy.

The SR (Comprehensive SR) carries the study verdict as the watch journal holds it. Its fields
are read generically: every number of the verdict becomes a NUM item and every text a TEXT
item, named after the journal's column, so a verdict the journal learns later (an "uncertain"
or "review" label, counts of uncertain or refused slices) flows through without a change
here. The statement that this is decision support and not a diagnosis is always the first
item, and is burnt into the Secondary Capture image.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STATEMENT = "Decision support for triage, not a diagnosis. A clinician must read the study."
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SCHEME = "99CTPI"  # private coding scheme for ctpi's own concept names
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902

# Copied from the received instance so the PACS files the result with the study.
IDENTITY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
)
# Verdict fields that are bookkeeping, not findings.
NOT_FINDINGS = {"name", "top_slice_id", "first_at", "updated_at", "positive", "model_sha256"}


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _meaning(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _text(key: str, value: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code(key[:16], _meaning(key))]
    item.TextValue = str(value)
    return item


def _num(key: str, value: float):
    from pydicom.dataset import Dataset

    measured = Dataset()
    measured.NumericValue = f"{float(value):.6g}"[:16]
    measured.MeasurementUnitsCodeSequence = [_code("1", "no units", "UCUM")]
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "NUM"
    item.ConceptNameCodeSequence = [_code(key[:16], _meaning(key))]
    item.MeasuredValueSequence = [measured]
    return item


def _base(source, sop_class: str, modality: str, series_number: int, description: str):
    """A new instance of ``source``'s study: identity copied, new series and instance UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    dataset = Dataset()
    for keyword in IDENTITY:
        if keyword in source:
            setattr(dataset, keyword, source.data_element(keyword).value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in dataset:
            setattr(dataset, keyword, "")  # type 2: present, may be empty
    now = time.localtime()
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = modality
    dataset.SeriesNumber = series_number
    dataset.InstanceNumber = 1
    dataset.SeriesDescription = description
    dataset.Manufacturer = "ctpi"
    dataset.ContentDate = dataset.InstanceCreationDate = dataset.SeriesDate = time.strftime("%Y%m%d", now)
    dataset.ContentTime = dataset.InstanceCreationTime = dataset.SeriesTime = time.strftime("%H%M%S", now)
    if "SpecificCharacterSet" in source:
        dataset.SpecificCharacterSet = source.SpecificCharacterSet
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    dataset.file_meta = meta
    return dataset


def findings(verdict: dict, model: dict) -> list[tuple[str, object]]:
    """The verdict and model fields the SR carries, in order: label first, then numbers and
    texts as the journal names them, then the model."""
    items = [("verdict", verdict.get("label") or "no readable slice")]
    for key, value in verdict.items():
        if key in NOT_FINDINGS or key == "label" or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float, str)):
            items.append((key if key != "probability" else "study_probability", value))
    for key in ("name", "version", "format", "sha256"):
        if model.get(key):
            items.append((f"model_{key}", model[key]))
    return items


def build_sr(source, verdict: dict, model: dict):
    """The Comprehensive SR of one study's verdict (``verdict``: the journal's study record;
    ``model``: name, version, format, sha256 of the bundle that made it)."""
    dataset = _base(source, COMPREHENSIVE_SR, "SR", SR_SERIES_NUMBER, "ctpi COVID-19 triage (decision support)")
    dataset.ValueType = "CONTAINER"
    dataset.ConceptNameCodeSequence = [_code("18748-4", "Diagnostic imaging report", "LN")]
    dataset.ContinuityOfContent = "SEPARATE"
    dataset.CompletionFlag = "COMPLETE"
    dataset.VerificationFlag = "UNVERIFIED"
    dataset.ReferencedPerformedProcedureStepSequence = []
    dataset.PerformedProcedureCodeSequence = []
    content = [_text("statement", STATEMENT)]
    for key, value in findings(verdict, model):
        content.append(_num(key, value) if isinstance(value, (int, float)) else _text(key, value))
    dataset.ContentSequence = content
    return dataset


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def burn_in(rgb: np.ndarray, lines: list[str], size: int = 512) -> np.ndarray:
    """The image scaled to ``size`` wide with a black band of text lines below it."""
    image = Image.fromarray(rgb).convert("RGB")
    image = image.resize((size, max(1, round(image.height * size / image.width))), Image.Resampling.BILINEAR)
    line_height = max(14, size // 28)
    band = line_height * len(lines) + 8
    canvas = Image.new("RGB", (size, image.height + band), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(line_height - 4)
    for index, line in enumerate(lines):
        draw.text((6, image.height + 4 + index * line_height), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def caption(verdict: dict, model: dict) -> list[str]:
    probability = verdict.get("probability")
    shown = "n/a" if probability is None else f"{probability:.2f}"
    threshold = verdict.get("threshold")
    return [
        f"ctpi: {verdict.get('label') or 'no readable slice'}  P={shown}"
        + ("" if threshold is None else f" (threshold {threshold:.2f})")
        + f"  {verdict.get('positive_slices', 0)}/{verdict.get('slices', 0)} slices positive",
        f"model {model.get('name', '?')} {model.get('version', '')} {str(model.get('sha256', ''))[:12]}",
        "Decision support for triage, not a diagnosis.",
    ]


def build_sc(source, rgb: np.ndarray, verdict: dict, model: dict):
    """The Secondary Capture: the top slice (with its heatmap, when given one) and the caption
    burnt in; ``rgb`` is an ``H x W x 3`` uint8 image."""
    pixels = burn_in(rgb, caption(verdict, model))
    dataset = _base(source, SECONDARY_CAPTURE, "OT", SC_SERIES_NUMBER, "ctpi top slice and heatmap (decision support)")
    dataset.ConversionType = "WSD"
    dataset.BurnedInAnnotation = "YES"
    dataset.ImageType = ["DERIVED", "SECONDARY"]
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = "RGB"
    dataset.PlanarConfiguration = 0
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return dataset


def encode(dataset) -> bytes:
    """Part-10 bytes (preamble, file meta, explicit VR little endian)."""
    import pydicom

    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        pydicom.dcmwrite(buffer, dataset, write_like_original=False)
    return buffer.getvalue()
