"""The input guard: is a decoded file an axial chest CT slice? Anything else is refused.

A model scores whatever it is given, so a photo, a screenshot or a head CT would get a
confident COVID/NonCOVID answer. The guard looks at the decoded image before letterboxing
(:class:`device.preprocess.DecodedSlice`) and refuses with :class:`BadSliceError` reason
``not-ct`` and a sentence a person can act on.

Three stages, all pure numpy on a 64-pixel thumbnail (about a millisecond on the x86 build
machine):

0. **The DICOM header**, when there is one: a Modality other than CT (MR, CR, DX, US, MG...),
   an ImageOrientationPatient that is not axial (coronal or sagittal reconstructions), or a
   BodyPartExamined that is clearly not the chest (HEAD, ABDOMEN, PELVIS...) is refused at
   once with a sentence saying so. A header that says "axial chest CT" still goes through the
   image checks: a chest series also holds neck and upper-abdomen slices.
1. **Rules** for the obvious: colour images (photos, histology, fundus, dermatoscopy,
   screenshots), flat images, noise, pages with a light background (scanned documents,
   screenshots), and images with no dark, air-filled lungs enclosed by a brighter body.
2. **A learned acceptance region** (``guard.json`` in the bundle, fitted at conversion time by
   ``python -m convert.guard`` on the bundle's training slices): one Gaussian per training
   source over :data:`FEATURE_NAMES` (shape of the body, the lungs on both sides of the
   midline, air around the body, histogram, texture). A slice whose Mahalanobis distance to
   every source exceeds that source's threshold is refused as unlike any CT slice the model
   was trained on. ``guard.json`` is listed with its sha256 in the manifest, so an edited guard
   is refused by :func:`device.bundle.load_bundle` like an edited model.

A bundle without ``guard.json`` (made before the guard existed) still loads; the guard is then
skipped with a warning, because rules whose acceptance was never measured on that bundle's
data could silently refuse real slices on an appliance that worked yesterday.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from device.preprocess import BadSliceError, DecodedSlice

log = logging.getLogger(__name__)

GUARD_FILE = "guard.json"
GUARD_SCHEMA = "ctpi.guard/1"
FEATURE_VERSION = 2
WORK_SIDE = 64  # the thumbnail every feature is computed on (a box-filtered integer reduction)
REASON = "not-ct"

FEATURE_NAMES = (
    "image_aspect",  # log(width / height) of the file
    "dark_fraction",  # share of the thumbnail darker than 0.2 (air, lungs)
    "bright_fraction",  # share brighter than 0.8
    "mid_fraction",  # share between 0.3 and 0.7 (a lung window leaves few mid greys; photos many)
    "histogram_entropy",  # of a 16-bin histogram, bits
    "otsu_threshold",  # dark/bright split
    "body_fraction",  # share of the thumbnail inside the body outline
    "body_fill",  # body area / its bounding box (an ellipse: 0.79)
    "body_aspect",  # log(width / height) of the body's bounding box
    "lung_fraction",  # dark pixels enclosed by the body / body area
    "lung_core",  # enclosed dark pixels that survive a 1-pixel erosion / body area (not text strokes)
    "lung_balance",  # smaller / larger of the enclosed dark area left and right of the midline
    "lung_lateral",  # share of enclosed dark area outside the middle third of the body
    "lung_centre_row",  # mean row of the enclosed dark area, 0 at the body's top, 1 at its bottom
    "lung_height",  # rows holding enclosed dark area / body height (coronal lungs are tall)
    "lung_bottom_share",  # share of the enclosed dark area in the bottom third of the body
    "lung_darkness",  # mean intensity of the enclosed dark area
    "body_brightness",  # mean intensity of the body's bright part
    "outside_dark",  # share of the outside of the body that is dark (air)
    "corner_dark",  # share of the four corners that is dark
    "border_dark_rows",  # share of the top and bottom border bands that is dark
    "border_dark_columns",  # share of the left and right border bands that is dark
    "symmetry",  # correlation of the body with its mirror image
    "edge_density",  # mean gradient magnitude
    "body_texture",  # mean gradient inside the body's bright part (soft tissue is smooth)
    "orientation_entropy",  # of the gradient orientations, bits of 8 bins (buildings: few; anatomy: many)
    "noise_ratio",  # mean |Laplacian| / mean gradient: high for noise
    "colour_fraction",  # share of strongly coloured pixels (0 for grey files)
)


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one image: ``accepted``, a short ``check`` name for logs and a
    ``message`` a person can act on when refused."""

    accepted: bool
    check: str
    message: str = ""
    distance: float | None = None


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """At most WORK_SIDE pixels a side, by an integer box reduction (antialiased, and about
    twice as fast as a bilinear resize of the float image)."""
    factor = max(1, -(-max(pixels.shape) // WORK_SIDE))
    if factor == 1:
        return np.asarray(pixels, dtype=np.float32)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(image.reduce(factor), dtype=np.float32)


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """Counts of ``values`` in [0, 1] over ``bins`` equal bins (np.histogram's bins, faster)."""
    return np.bincount(np.minimum((values.ravel() * bins).astype(np.intp), bins - 1), minlength=bins)


OTSU_BINS = 64
_OTSU_CENTRES = (np.arange(OTSU_BINS) + 0.5) / OTSU_BINS


def _otsu(values: np.ndarray) -> float:
    """The split between the bin that maximises the between-class variance and the next."""
    weights = _histogram(values, OTSU_BINS) / max(1, values.size)
    below = np.cumsum(weights)[:-1]
    mean_below = np.cumsum(weights * _OTSU_CENTRES)
    spread = below * (1.0 - below)
    between = (mean_below[-1] * below - mean_below[:-1]) ** 2 / np.where(spread > 0, spread, np.inf)
    return float(_OTSU_CENTRES[int(np.argmax(between))] + 0.5 / OTSU_BINS)


def _span_mask(foreground: np.ndarray) -> np.ndarray:
    """Pixels between the first and last foreground pixel of their row AND of their column:
    the body outline with its holes (lungs) filled, without a connected-component pass."""

    def along_rows(mask: np.ndarray) -> np.ndarray:
        width = mask.shape[1]
        has = mask.any(axis=1)
        first = np.where(has, mask.argmax(axis=1), width)
        last = np.where(has, width - 1 - mask[:, ::-1].argmax(axis=1), -1)
        columns = np.arange(width)[None, :]
        return (columns >= first[:, None]) & (columns <= last[:, None])

    return along_rows(foreground) & along_rows(foreground.T).T


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by a 3x3 cross, ``steps`` times (edges count as outside)."""
    for _ in range(steps):
        inner = np.zeros_like(mask)
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        mask = inner
    return mask


def features(decoded: DecodedSlice) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one decoded image (float64)."""
    raw = _thumbnail(decoded.pixels)
    flat = raw.ravel()
    last = flat.size - 1
    low, high = np.partition(flat, (last // 100, last - last // 100))[[last // 100, last - last // 100]]  # 1st, 99th percentile
    grey = np.clip((raw - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    height, width = grey.shape
    histogram = _histogram(grey, 16) / grey.size
    nonzero = histogram[histogram > 0]
    threshold = _otsu(grey)
    foreground = grey > threshold
    # the outline from anything above air: in a soft-tissue window the chest wall is grey fat
    body = _span_mask(grey > max(0.08, 0.4 * threshold))
    body_area = max(1, int(body.sum()))
    body_rows, body_columns = body.any(axis=1), body.any(axis=0)
    found = bool(body_rows.any())
    if found:
        top, bottom = int(body_rows.argmax()), height - int(body_rows[::-1].argmax())
        left, right = int(body_columns.argmax()), width - int(body_columns[::-1].argmax())
    else:
        top, bottom, left, right = 0, height, 0, width
    box_w, box_h = max(1, right - left), max(1, bottom - top)
    # lungs: the dark class of the body's own histogram (air outside does not set the split)
    inside = grey[body]
    lung_split = _otsu(inside) if inside.size > 16 and float(inside.max() - inside.min()) > 1e-3 else threshold
    lungs = body & (grey <= lung_split)
    lung_area = int(lungs.sum())
    lung_columns = lungs.sum(axis=0)
    lung_rows = lungs.sum(axis=1)
    middle = left + box_w / 2.0
    column_centre = np.arange(width) + 0.5
    left_lung = int(lung_columns[column_centre < middle].sum())
    right_lung = lung_area - left_lung
    central = int(lung_columns[np.abs(column_centre - middle) < box_w / 6.0].sum())
    row_position = (np.arange(height) + 0.5 - top) / box_h
    if lung_area:
        lung_centre_row = float((lung_rows * row_position).sum()) / lung_area
        lung_height = float((lung_rows > 0).sum()) / box_h
        lung_bottom = float(lung_rows[row_position > 2.0 / 3.0].sum()) / lung_area
    else:
        lung_centre_row, lung_height, lung_bottom = 0.5, 0.0, 0.0
    outside = ~body
    dark = grey < 0.2
    corner = max(2, min(height, width) // 8)
    band = max(1, min(height, width) // 16)
    corners = dark[:corner, :corner].sum() + dark[:corner, -corner:].sum() + dark[-corner:, :corner].sum() + dark[-corner:, -corner:].sum()
    crop = grey[top:bottom, left:right]
    crop_centred = crop - crop.mean()
    spread = float((crop_centred * crop_centred).sum())
    symmetry = float((crop_centred * crop_centred[:, ::-1]).sum()) / spread if spread > 1e-9 else 1.0
    gx = np.diff(grey, axis=1)[:-1, :]
    gy = np.diff(grey, axis=0)[:, :-1]
    magnitude = np.abs(gx) + np.abs(gy)
    edge = float(magnitude.mean())
    solid = (body & foreground)[:-1, :-1]
    # gradient orientation modulo pi in 8 bins, weighted by magnitude
    angle = np.arctan2(gy, gx)
    bins = np.minimum(((angle % np.pi) * (8 / np.pi)).astype(np.intp), 7)
    orientation = np.bincount(bins.ravel(), weights=magnitude.ravel(), minlength=8)
    orientation = orientation[orientation > 0] / max(float(orientation.sum()), 1e-12)
    laplacian = np.abs(grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1])
    colour = 0.0
    if decoded.colour is not None and decoded.colour.size:
        rgb = decoded.colour.astype(np.int16)
        chroma = rgb.max(axis=2) - rgb.min(axis=2)
        colour = float((chroma > 40).mean())
    values = [
        float(np.log(decoded.width / decoded.height)),
        float(dark.mean()),
        float((grey > 0.8).mean()),
        float(((grey > 0.3) & (grey < 0.7)).mean()),
        float(-(nonzero * np.log2(nonzero)).sum()),
        threshold,
        body_area / grey.size if found else 0.0,
        body_area / (box_w * box_h) if found else 0.0,
        float(np.log(box_w / box_h)),
        lung_area / body_area,
        float(_erode(lungs, 1).sum()) / body_area,
        min(left_lung, right_lung) / max(1, left_lung, right_lung),
        1.0 - central / max(1, lung_area),
        lung_centre_row,
        lung_height,
        lung_bottom,
        float(grey[lungs].mean()) if lung_area else 1.0,
        float(grey[body & foreground].mean()) if (body & foreground).any() else 0.0,
        float(dark[outside].mean()) if outside.any() else 0.0,
        float(corners) / (4 * corner * corner),
        float(dark[:band].mean() + dark[-band:].mean()) / 2,
        float(dark[:, :band].mean() + dark[:, -band:].mean()) / 2,
        symmetry,
        edge,
        float(magnitude[solid].mean()) if solid.any() else 0.0,
        float(-(orientation * np.log2(orientation)).sum()),
        float(laplacian.mean()) / max(edge, 1e-6),
        colour,
    ]
    return np.asarray(values, dtype=np.float64)


# -- rules: what no chest CT slice looks like ------------------------------------------------

COLOUR_LIMIT = 0.12  # figures cut from papers carry coloured arrows and letters, never this much
NOISE_LIMIT = 1.6  # mean |Laplacian| / mean gradient; smooth anatomy stays well below
LUNG_CORE_MIN = 0.01  # solid dark area enclosed by the body, share of the body; lungs are far above


AXIAL_TOLERANCE_DEGREES = 30.0  # gantry tilt and oblique axial reformats stay within this
NOT_CHEST_BODY_PARTS = (
    "HEAD", "BRAIN", "SKULL", "FACE", "ORBIT", "SINUS", "IAC", "NECK", "ABDOMEN", "ABD", "PELVIS", "KIDNEY",
    "LIVER", "HIP", "KNEE", "LEG", "ANKLE", "FOOT", "SHOULDER", "ARM", "ELBOW", "WRIST", "HAND", "EXTREMITY",
)  # fmt: skip
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORAX", "THORAC")


def header_verdict(decoded: DecodedSlice) -> Verdict | None:
    """A refusal from what a DICOM header says the image shows, or None (not DICOM, or nothing
    in the header rules it out)."""
    header = decoded.dicom
    if not header:
        return None
    modality = header.get("modality") or ""
    if modality and modality != "CT":
        return Verdict(False, "dicom-modality", f"is a DICOM {modality} image (Modality {modality}), not a CT slice")
    body_part = header.get("body_part") or ""
    words = [w for w in "".join(c if c.isalpha() else " " for c in body_part).split() if w]
    if words and not any(w.startswith(CHEST_BODY_PARTS) for w in words) and any(w in NOT_CHEST_BODY_PARTS for w in words):
        return Verdict(False, "dicom-body-part", f"is a DICOM CT of the {body_part.lower()} (BodyPartExamined), not of the chest")
    orientation = header.get("orientation")
    if orientation is not None:
        row, column = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
        normal = np.cross(row, column)
        length = float(np.linalg.norm(normal))
        if length > 1e-6:
            normal = np.abs(normal / length)
            if normal[2] < np.cos(np.radians(AXIAL_TOLERANCE_DEGREES)):
                plane = "sagittal" if normal[0] >= normal[1] else "coronal"
                return Verdict(
                    False, "dicom-orientation", f"is a {plane} DICOM CT image (ImageOrientationPatient), not an axial slice"
                )
    return None


def rule_verdict(values: np.ndarray, decoded: DecodedSlice) -> Verdict | None:
    """A refusal for the obvious cases, or None when the rules see nothing wrong."""
    f = dict(zip(FEATURE_NAMES, values, strict=True))
    pixels = decoded.pixels
    if float(pixels.max() - pixels.min()) < 1e-3 or f["histogram_entropy"] < 0.5:
        return Verdict(False, "flat", "is a flat image with no structure, not a CT slice")
    if f["colour_fraction"] > COLOUR_LIMIT:
        return Verdict(
            False, "colour", "looks like a colour photograph or illustration, not a CT slice (CT slices are grey)"
        )
    if f["noise_ratio"] > NOISE_LIMIT:
        return Verdict(False, "noise", "looks like random noise or a fine pattern, not a CT slice")
    if f["lung_core"] < LUNG_CORE_MIN:
        return Verdict(
            False,
            "no-lungs",
            "shows no dark lungs inside a body outline: not an axial chest CT slice (head or abdominal CT, X-ray, or another image?)",
        )
    return None


# -- the learned acceptance region ------------------------------------------------------------


@dataclass(frozen=True)
class SourceModel:
    """One training source's Gaussian over the features, and the distance it accepts."""

    name: str
    mean: np.ndarray
    precision: np.ndarray  # inverse of the (shrunk) covariance
    threshold: float  # largest accepted squared Mahalanobis distance

    def distance(self, values: np.ndarray) -> float:
        delta = values - self.mean
        return float(delta @ self.precision @ delta)


class Guard:
    """Rules plus, when fitted, the per-source acceptance regions of ``guard.json``."""

    def __init__(self, sources: list[SourceModel], metadata: dict | None = None):
        self.sources = sources
        self.metadata = metadata or {}

    @classmethod
    def from_dict(cls, data: dict) -> Guard:
        if data.get("schema") != GUARD_SCHEMA or data.get("feature_version") != FEATURE_VERSION:
            raise ValueError(
                f"guard schema {data.get('schema')!r} features v{data.get('feature_version')!r} is not what this ctpi "
                f"computes ({GUARD_SCHEMA}, v{FEATURE_VERSION}); refit it with `python -m convert.guard`"
            )
        if list(data.get("features", [])) != list(FEATURE_NAMES):
            raise ValueError("guard features differ from this ctpi's; refit it with `python -m convert.guard`")
        sources = [
            SourceModel(
                name=str(item["name"]),
                mean=np.asarray(item["mean"], dtype=np.float64),
                precision=np.asarray(item["precision"], dtype=np.float64),
                threshold=float(item["threshold"]),
            )
            for item in data["sources"]
        ]
        size = len(FEATURE_NAMES)
        if not sources or any(s.mean.shape != (size,) or s.precision.shape != (size, size) for s in sources):
            raise ValueError("guard parameters have the wrong shape; refit it with `python -m convert.guard`")
        return cls(sources, {k: v for k, v in data.items() if k != "sources"})

    def to_dict(self) -> dict:
        return {
            **self.metadata,
            "schema": GUARD_SCHEMA,
            "feature_version": FEATURE_VERSION,
            "features": list(FEATURE_NAMES),
            "sources": [
                {"name": s.name, "mean": s.mean.tolist(), "precision": s.precision.tolist(), "threshold": s.threshold}
                for s in self.sources
            ],
        }

    def distances(self, values: np.ndarray) -> list[float]:
        """Squared Mahalanobis distance to each source, divided by its threshold (<= 1 accepts)."""
        return [s.distance(values) / s.threshold for s in self.sources]

    def check(self, decoded: DecodedSlice) -> Verdict:
        refusal = header_verdict(decoded)
        if refusal is not None:
            return refusal
        values = features(decoded)
        refusal = rule_verdict(values, decoded)
        if refusal is not None:
            return refusal
        nearest = min(self.distances(values))
        if nearest > 1.0:
            return Verdict(
                False,
                "atypical",
                "does not look like an axial chest CT slice the model was trained on (a different body part, "
                "view or kind of image?)",
                nearest,
            )
        return Verdict(True, "ct", "", nearest)

    def enforce(self, decoded: DecodedSlice) -> None:
        """Raise ``BadSliceError("not-ct", ...)`` unless ``decoded`` passes."""
        verdict = self.check(decoded)
        if not verdict.accepted:
            raise BadSliceError(REASON, f"refused: {verdict.message} [guard: {verdict.check}]")


def load_guard(bundle) -> Guard | None:
    """The guard a bundle carries, or None (with a warning) for a bundle made before guards.

    ``guard.json`` is only read when the manifest lists it, so its sha256 has been checked by
    :func:`device.bundle.load_bundle`."""
    if GUARD_FILE not in bundle.manifest.get("files", {}):
        log.warning(
            "bundle %s carries no input guard (%s): every image that decodes will be scored; "
            "fit one with `python -m convert.guard --bundle %s --data DATA`",
            bundle.path,
            GUARD_FILE,
            bundle.path,
        )
        return None
    from device.bundle import BundleError

    path = Path(bundle.path) / GUARD_FILE
    try:
        return Guard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"bundle {bundle.path}: {GUARD_FILE} cannot be used: {error}") from None
