"""The preprocessing contract: a slice file becomes a model input tensor, here and only here.

Training, calibration, evaluation, the watch daemon and the UI all call :func:`load_slice`,
so the Pi sees exactly what training saw. The steps (version 3, id
``ctpi-gray-letterbox-stretch``) are:

1. **Decode by content**, never by file name: PNG and JPEG through Pillow, DICOM (``DICM``
   magic at byte 128) through :mod:`device.core.dicom` (Hounsfield units, then the bundle's
   ``dicom_window``: the lung window unless its manifest says otherwise). Real data
   has JPEGs named ``.png``. Anything else is refused with :class:`BadSliceError`.
2. **Refuse absurd files before decoding pixels**: empty files, files over
   ``MAX_FILE_BYTES``, images with a side under ``MIN_SIDE`` or more than ``MAX_PIXELS``
   pixels (decompression bombs declare their size in the header), truncated data.
3. **One channel of intensity, whatever the mode.** Colour (RGB, CMYK, YCbCr, palette) becomes
   ITU-R 601-2 luma (Pillow's ``convert("L")``); an alpha channel is composited over black
   (CT background is air, which is black); 16- and 32-bit grey keep their full precision as
   float. In the COVID-CT data mode and alpha correlate with the label, so they must not
   survive this step.
3b. **Crop to the body** (versions 2 and 3; ``crop="body"``): the box that holds the body and nothing
   beyond it (:func:`device.core.guard_body.body_crop`, the input guard's own locator, refined
   to full resolution). The training sources come cropped to the body's edges; a scanner or
   PACS export frames the body in air with the table under it, and letterboxed whole that put
   the shipped models at chance on the same São Paulo slices (val ROC AUC 0.53 against 0.96). A
   body that already touches the edges, as in nearly every São Paulo slice and most COVID-CT
   figures, is left as it is. Version 3 leaves out a scanner table that touches the body too
   (``body_crop(..., table=True)``: São Paulo val framed with a table, MobileNetV2's AUC 0.944 →
   0.966 and ResNet50's 0.887 → 0.944 behind the version-2 heads).
   Version 1 (bundles made before version 2) letterboxes the whole image; every version is
   implemented, and a bundle's manifest says which it was trained with.
4. **Letterbox to the model size**: scale by ``min(H/h, W/w)`` with Pillow's bilinear filter
   on float data (Pillow widens the filter support when shrinking, so it is antialiased), keep
   the aspect ratio so anatomy is not distorted, and centre it on a black canvas.
5. **Contrast stretch** of the resized image (padding excluded): the 0.5th and 99.5th
   percentiles map to 0 and 255, values outside are clipped. This makes 8-bit figure crops,
   12-bit data in 16-bit PNGs and windowed DICOM comparable, and ignores a few burnt-in
   letters or arrows.
6. **Round to uint8** ``H x W x channels`` (channels 1, or 3 by repetition). Pixel scaling
   for the network (e.g. to [-1, 1]) lives inside the model graph, so every exported model
   takes these raw 0..255 pixels.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from device.core.guard_body import body_crop

PREPROCESSING_ID = "ctpi-gray-letterbox-stretch"
PREPROCESSING_VERSION = 3  # 3: the crop leaves a table out; 2: crop to the body first (``crop``); 1: the whole image
SUPPORTED_VERSIONS = (1, 2, 3)
CROPS = ("none", "body")

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 8000 x 5000; a CT slice is 512 x 512, the dataset's largest figure 1671 wide
MIN_SIDE = 16
ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO"}  # MPO: the JPEG variant some cameras write
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
# Level and width in HU that map DICOM to 0..255: the lung window (air black, soft tissue and bone
# white), what every shipped bundle was trained with. A bundle may name another in its manifest.
LUNG_WINDOW = (-600.0, 1500.0)

Source = str | Path | bytes


class BadSliceError(ValueError):
    """A file that cannot become a model input. ``reason`` is a short stable code for
    journals and JSON (``empty``, ``truncated``, ``not-an-image``, ...); ``str()`` is the
    sentence a person reads."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreprocessSpec:
    """What a bundle's manifest records about preprocessing; it pins every free parameter."""

    height: int = 224
    width: int = 224
    channels: int = 1
    id: str = PREPROCESSING_ID
    version: int = PREPROCESSING_VERSION
    crop: str = "body"  # versions 2 and 3: "body" (step 3b) or "none"; version 1 has no crop
    resize_filter: str = "bilinear"
    letterbox: bool = True
    pad_value: int = 0
    stretch_percentiles: tuple[float, float] = (0.5, 99.5)
    dicom_window: tuple[float, float] = LUNG_WINDOW  # level, width in HU that DICOM is decoded with
    output: str = "uint8 0..255, HWC"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, not {self.crop!r}")
        if self.version == 1 and self.crop != "none":
            raise ValueError("preprocessing version 1 does not crop: give crop='none' with version=1")

    def to_manifest(self) -> dict:
        data = asdict(self)
        if self.version == 1:  # a version-1 manifest has no crop field, and never crops
            del data["crop"]
        data["stretch_percentiles"] = list(self.stretch_percentiles)
        data["dicom_window"] = list(self.dicom_window)
        return data

    @classmethod
    def from_manifest(cls, data: dict) -> PreprocessSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing fields {sorted(unknown)}")
        if data.get("id") != PREPROCESSING_ID or data.get("version") not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"preprocessing {data.get('id')!r} version {data.get('version')!r} is not one "
                f"this ctpi implements ({PREPROCESSING_ID!r} versions {', '.join(map(str, SUPPORTED_VERSIONS))}); "
                "upgrade ctpi or use a bundle made for these versions"
            )
        values = dict(data)
        if values["version"] == 1:
            if "crop" in values:
                raise ValueError("preprocessing version 1 has no crop field; a manifest that gives one was edited")
            values["crop"] = "none"
        elif values.get("crop") not in CROPS:
            raise ValueError(f"preprocessing version {values['version']} needs crop, one of {', '.join(CROPS)}, not {values.get('crop')!r}")
        for key in ("stretch_percentiles", "dicom_window"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        spec = cls(**values)
        if len(spec.dicom_window) != 2 or not spec.dicom_window[1] > 0:
            raise ValueError(f"dicom_window must be [level, width] in HU with width > 0, not {list(spec.dicom_window)}")
        if spec.channels not in (1, 3) or spec.height < MIN_SIDE or spec.width < MIN_SIDE:
            raise ValueError(f"unsupported input size {spec.height}x{spec.width}x{spec.channels}")
        return spec


@dataclass(frozen=True)
class DecodedSlice:
    """A decoded slice: one channel of float intensities plus what it was."""

    pixels: np.ndarray  # float32, 2-D
    format: str  # PNG, JPEG, DICOM
    mode: str  # Pillow mode, or e.g. "MONOCHROME2/16" for DICOM
    width: int
    height: int
    colour: np.ndarray | None = None  # uint8 RGB thumbnail (<= 64 px a side) of colour files, for device.core.guard
    dicom: dict | None = None  # DICOM only: modality, body_part, orientation (device.core.dicom), for device.core.guard


COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
COLOUR_THUMBNAIL_SIDE = 64


def _colour_thumbnail(image: Image.Image) -> np.ndarray | None:
    """A small RGB copy of a colour image (alpha over black, as step 3): the input guard's
    only view of colour, which step 3 removes. Grey modes give None."""
    if image.mode not in COLOUR_MODES:
        return None
    factor = max(1, max(image.size) // COLOUR_THUMBNAIL_SIDE)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode in ("PA", "RGBa") else "RGB")
    small = image.reduce(factor) if factor > 1 else image
    if small.mode == "RGBA":
        small = Image.alpha_composite(Image.new("RGBA", small.size, (0, 0, 0, 255)), small)
    return np.asarray(small.convert("RGB"), dtype=np.uint8)


def read_source(source: Source) -> bytes:
    """The bytes of a slice, with size limits checked before reading everything."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise BadSliceError(
                    "too-large",
                    f"{path.name}: file is {size / 1e6:.0f} MB; slices over "
                    f"{MAX_FILE_BYTES / 1e6:.0f} MB are refused",
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadSliceError("missing", f"{path.name}: file disappeared before it could be read") from None
        except IsADirectoryError:
            raise BadSliceError("not-a-file", f"{path.name}: is a directory, not a slice") from None
        except PermissionError:
            raise BadSliceError("unreadable", f"{path.name}: permission denied") from None
    if not data:
        raise BadSliceError("empty", "file is empty (0 bytes); was it still being copied?")
    if len(data) > MAX_FILE_BYTES:
        raise BadSliceError("too-large", f"file is {len(data) / 1e6:.0f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB")
    return data


def _check_dimensions(width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadSliceError(
            "too-small", f"image is {width}x{height} pixels; a slice needs at least {MIN_SIDE} on each side"
        )
    if width * height > MAX_PIXELS:
        raise BadSliceError(
            "too-large",
            f"image declares {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
            f"more than {MAX_PIXELS / 1e6:.0f} MP is refused (decompression bomb guard)",
        )


def _to_intensity(image: Image.Image) -> np.ndarray:
    """One float32 channel from any supported Pillow mode (step 3)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.asarray(image, dtype=np.float32)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("L"), dtype=np.float32)
    if mode in ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        if mode in ("LAB", "HSV"):
            image = image.convert("RGB")
        return np.asarray(image.convert("L"), dtype=np.float32)
    raise BadSliceError("unsupported-mode", f"image mode {mode!r} is not supported")


def decode_slice(source: Source, spec: PreprocessSpec | None = None) -> DecodedSlice:
    """Steps 1-3: bytes to one channel of float intensities, or :class:`BadSliceError`.

    ``spec`` is the bundle's preprocessing: DICOM is windowed with its ``dicom_window``, so a
    bundle trained on another window sees what it was trained on. Pass it wherever a slice is
    decoded for a bundle; without one (no bundle at hand) it is the default spec's lung window."""
    data = read_source(source)
    from device.core import dicom  # local: keeps pydicom off the import path of PNG-only users

    if dicom.is_dicom(data):
        window = (spec or PreprocessSpec()).dicom_window
        pixels, mode, header = dicom.decode_with_header(data, window)
        _check_dimensions(pixels.shape[1], pixels.shape[0])
        return DecodedSlice(pixels, "DICOM", mode, pixels.shape[1], pixels.shape[0], dicom=header)
    try:
        image = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        if data.startswith(IMAGE_SIGNATURES):  # the right start but too little of it
            raise BadSliceError("truncated", "image data is truncated (was the file still being copied?)") from None
        hint = " (it looks like text)" if _looks_like_text(data) else ""
        raise BadSliceError("not-an-image", f"not a PNG, JPEG or DICOM image{hint}") from None
    except Image.DecompressionBombError as error:
        raise BadSliceError("too-large", f"refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSliceError("not-an-image", f"cannot be read as an image: {error}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadSliceError(
            "unsupported-format", f"{image.format} images are not accepted; export slices as PNG, JPEG or DICOM"
        )
    _check_dimensions(*image.size)
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise BadSliceError("too-large", f"refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadSliceError("truncated", f"{image.format} data is truncated or corrupt ({error})") from None
    pixels = _to_intensity(image)
    colour = _colour_thumbnail(image)
    return DecodedSlice(pixels, "JPEG" if image.format == "MPO" else image.format, image.mode, *image.size, colour=colour)


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def crop_box(pixels: np.ndarray, spec: PreprocessSpec) -> tuple[int, int, int, int] | None:
    """Step 3b's box (top, bottom, left, right) of decoded ``pixels``, or None when ``spec`` does
    not crop. Callers that time the input guard call it before the guard: the guard's view and
    the crop find the body the same way, once per decoded slice (``device.core.guard_body``), so
    the finding is preprocessing's cost, which the model needs with the guard on or off."""
    return body_crop(pixels, table=spec.version >= 3) if spec.crop == "body" else None


def prepare(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Steps 3b-6: one float channel to the model's ``H x W x C`` uint8 input."""
    box = crop_box(pixels, spec)
    if box is not None:  # a view, no copy (the whole image when the body touches its edges)
        pixels = pixels[box[0] : box[1], box[2] : box[3]]
    height, width = pixels.shape
    scale = min(spec.height / height, spec.width / width)
    new_w = max(1, min(spec.width, round(width * scale)))
    new_h = max(1, min(spec.height, round(height * scale)))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F").resize(
            (new_w, new_h), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    low, high = np.percentile(resized, spec.stretch_percentiles)
    if high - low > 1e-6:
        stretched = np.clip((resized - low) * (255.0 / (high - low)), 0.0, 255.0)
    else:  # a constant image carries no information; keep it black rather than divide by zero
        stretched = np.zeros_like(resized)
    canvas = np.full((spec.height, spec.width), spec.pad_value, dtype=np.uint8)
    top = (spec.height - new_h) // 2
    left = (spec.width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = np.rint(stretched).astype(np.uint8)
    return np.repeat(canvas[:, :, None], spec.channels, axis=2)


def load_slice(source: Source, spec: PreprocessSpec) -> np.ndarray:
    """File (path or bytes) to model input: the one function everything calls."""
    return prepare(decode_slice(source, spec).pixels, spec)
