"""DICOM slices: Hounsfield units and a window (the bundle's, the lung window by default), without
ever touching patient fields.

Only pixel data, the three attributes needed to turn it into Hounsfield units
(``RescaleSlope``, ``RescaleIntercept``, ``PhotometricInterpretation``) and three that say what
the image shows (``Modality``, ``BodyPartExamined``, ``ImageOrientationPatient``: the input
guard's header check) are read; nothing here logs or returns patient identifiers. pydicom is
imported lazily so PNG-only use does not pay for it.
"""

from __future__ import annotations

import io

import numpy as np

from device.core.preprocess import LUNG_WINDOW, BadSliceError

__all__ = ["LUNG_WINDOW", "apply_window", "decode", "decode_with_header", "import_pydicom_lean", "is_dicom", "to_hounsfield"]

# Optional packages pydicom 3 imports for its test-data downloader (pydicom.data.download), only
# because they are installed (the page's dependencies bring them): requests (with urllib3, idna,
# charset_normalizer, certifi) and tqdm, about 5 MB of a long-running service's memory for
# downloads it never makes.
DOWNLOADER_EXTRAS = ("requests", "tqdm")
# pydicom's dictionary of vendors' private tags (names and VRs of 10,545 elements of 449 vendors):
# 1.6 MB of a daemon's memory. ctpi reads standard attributes only (pixels, rescale, Modality,
# BodyPartExamined, orientation, patient and study identifiers); without it a private element
# still reads, as bytes of VR UN when the file's transfer syntax does not give its VR.
PRIVATE_DICTIONARY = "pydicom._private_dict"


def import_pydicom_lean():
    """Import pydicom (and so pynetdicom's base) without :data:`DOWNLOADER_EXTRAS`, for the
    daemons that must stay small (#19: the DICOM node, and the watch daemon through
    :func:`decode_with_header`). Call it before anything imports pydicom; later imports of
    those packages work as usual. It uses Python's documented switch (a
    ``None`` in ``sys.modules`` makes that import raise ImportError, which pydicom's downloader
    handles by falling back to urllib) and only while pydicom itself is imported. pydicom's
    table of private tags (:data:`PRIVATE_DICTIONARY`) is replaced by an empty one, which is
    what pydicom knows of a vendor it has no entry for."""
    import sys
    import types

    blocked = [name for name in DOWNLOADER_EXTRAS if name not in sys.modules] if "pydicom" not in sys.modules else []
    for name in blocked:
        sys.modules[name] = None
    if "pydicom" not in sys.modules:
        empty = types.ModuleType(PRIVATE_DICTIONARY, "no private tags (device.core.dicom.import_pydicom_lean)")
        empty.private_dictionaries = {}
        sys.modules[PRIVATE_DICTIONARY] = empty
    try:
        import pydicom
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    return pydicom


def is_dicom(data: bytes) -> bool:
    """Part-10 files carry ``DICM`` at byte 128; that is what we recognise (by content)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def to_hounsfield(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    # In place on the one float32 copy: the watch daemon decodes every slice here, and each
    # temporary of a 512x512 slice is 1 MB of its 80 MB budget (#19). Same values as the
    # expression ``pixels.astype(f4) * f4(slope) + f4(intercept)``.
    hounsfield = pixels.astype(np.float32)
    hounsfield *= np.float32(slope)
    hounsfield += np.float32(intercept)
    return hounsfield


def apply_window(hounsfield: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map ``[level - width/2, level + width/2]`` HU linearly to 0..255, clipping outside."""
    low = level - width / 2.0
    windowed = np.subtract(hounsfield, low)  # one new array, then in place (see to_hounsfield)
    windowed *= 255.0 / width
    return np.clip(windowed, 0.0, 255.0, out=windowed).astype(np.float32, copy=False)


def decode(data: bytes, window: tuple[float, float] = LUNG_WINDOW) -> tuple[np.ndarray, str]:
    """DICOM bytes to windowed float intensities (0..255) and a mode description. ``window``
    is (level, width) in HU: the bundle's ``dicom_window`` (``PreprocessSpec``), the lung window
    by default."""
    pixels, mode, _header = decode_with_header(data, window)
    return pixels, mode


def _header(dataset) -> dict:
    """What the image shows, for the input guard: ``modality`` and ``body_part`` (upper case,
    "" when absent) and ``orientation`` (the six direction cosines, or None)."""
    orientation = dataset.get("ImageOrientationPatient")
    try:
        cosines = tuple(float(v) for v in orientation) if orientation is not None else None
    except (TypeError, ValueError):
        cosines = None
    return {
        "modality": str(dataset.get("Modality", "") or "").strip().upper(),
        "body_part": str(dataset.get("BodyPartExamined", "") or "").strip().upper(),
        "orientation": cosines if cosines is not None and len(cosines) == 6 else None,
    }


def decode_with_header(data: bytes, window: tuple[float, float] = LUNG_WINDOW) -> tuple[np.ndarray, str, dict]:
    """:func:`decode` plus the :func:`_header` of the file."""
    try:
        pydicom = import_pydicom_lean()  # the watch daemon decodes every slice here (#19: 80 MB budget)
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a base dependency
        raise BadSliceError("unsupported-format", "DICOM needs pydicom: pip install pydicom") from None
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=False)
        if "PixelData" not in dataset:
            raise BadSliceError("not-an-image", "DICOM file has no pixel data")
        pixels = dataset.pixel_array
    except BadSliceError:
        raise
    except InvalidDicomError as error:
        raise BadSliceError("not-an-image", f"invalid DICOM: {error}") from None
    except Exception as error:  # pydicom raises many types for broken or compressed data
        raise BadSliceError("truncated", f"DICOM pixel data cannot be decoded: {type(error).__name__}") from None
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[0]  # multi-frame: the first frame is the slice
    if pixels.ndim != 2:
        raise BadSliceError("unsupported-mode", f"DICOM pixel array of shape {pixels.shape} is not a grey slice")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    hounsfield = to_hounsfield(pixels, slope, intercept)
    if photometric == "MONOCHROME1":  # inverted grey scale: high values are dark
        hounsfield = hounsfield.max() + hounsfield.min() - hounsfield
    level, width = window
    mode = f"{photometric}/{pixels.dtype.itemsize * 8}"
    return apply_window(hounsfield, level, width), mode, _header(dataset)
