"""The input guard: is a decoded file an axial chest CT slice? Anything else is refused.

A model scores whatever it is given, so a photo, a screenshot or a head CT would get a
confident COVID/NonCOVID answer. The guard looks at the decoded image before letterboxing
(:class:`device.preprocess.DecodedSlice`) and refuses with :class:`BadSliceError` reason
``not-ct`` and a sentence a person can act on.

Two stages, both pure numpy on a thumbnail (a few milliseconds on a Pi):

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
FEATURE_VERSION = 1
WORK_SIDE = 96  # the thumbnail every feature is computed on
REASON = "not-ct"

FEATURE_NAMES = (
    "image_aspect",  # log(width / height) of the file
    "dark_fraction",  # share of the thumbnail darker than 0.2 (air, lungs)
    "bright_fraction",  # share brighter than 0.8
    "histogram_entropy",  # of a 16-bin histogram, bits
    "otsu_threshold",  # dark/bright split
    "body_fraction",  # share of the thumbnail inside the body outline
    "body_fill",  # body area / its bounding box (an ellipse: 0.79)
    "body_aspect",  # log(width / height) of the body's bounding box
    "lung_fraction",  # dark pixels enclosed by the body / body area
    "lung_core",  # enclosed dark pixels that survive a 2-pixel erosion / body area (not text strokes)
    "lung_balance",  # smaller / larger of the enclosed dark area left and right of the midline
    "lung_lateral",  # share of enclosed dark area outside the middle third of the body
    "lung_darkness",  # mean intensity of the enclosed dark area
    "body_brightness",  # mean intensity of the body's bright part
    "outside_dark",  # share of the outside of the body that is dark (air)
    "corner_dark",  # share of the four corners that is dark
    "symmetry",  # correlation of the body with its mirror image
    "edge_density",  # mean gradient magnitude
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
    height, width = pixels.shape
    scale = min(1.0, WORK_SIDE / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """Counts of ``values`` in [0, 1] over ``bins`` equal bins (np.histogram's bins, faster)."""
    return np.bincount(np.minimum((values.ravel() * bins).astype(np.intp), bins - 1), minlength=bins)


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    histogram = _histogram(values, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = histogram.astype(np.float64) / max(1, histogram.sum())
    below = np.cumsum(weights)
    mean_below = np.cumsum(weights * centres)
    total_mean = mean_below[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * below - mean_below) ** 2 / (below * (1.0 - below))
    between = np.nan_to_num(between[:-1])
    return float(centres[int(np.argmax(between))] + (edges[1] - edges[0]) / 2)


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
    low, high = np.percentile(raw, (1.0, 99.0))
    grey = np.clip((raw - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    height, width = grey.shape
    histogram = _histogram(grey, 16) / grey.size
    nonzero = histogram[histogram > 0]
    threshold = _otsu(grey)
    foreground = grey > threshold
    # the outline from anything above air: in a soft-tissue window the chest wall is grey fat
    body = _span_mask(grey > max(0.08, 0.4 * threshold))
    body_area = max(1, int(body.sum()))
    rows, columns = np.nonzero(body)
    if rows.size:
        top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    else:
        top, bottom, left, right = 0, height, 0, width
    box_w, box_h = max(1, right - left), max(1, bottom - top)
    # lungs: the dark class of the body's own histogram (air outside does not set the split)
    inside = grey[body]
    lung_split = _otsu(inside) if inside.size > 16 and float(np.ptp(inside)) > 1e-3 else threshold
    lungs = body & (grey <= lung_split)
    lung_area = int(lungs.sum())
    middle = left + box_w / 2.0
    column_index = np.arange(width)[None, :]
    left_lung = int((lungs & (column_index < middle)).sum())
    right_lung = lung_area - left_lung
    third = box_w / 6.0
    central = int((lungs & (np.abs(column_index + 0.5 - middle) < third)).sum())
    outside = ~body
    dark = grey < 0.2
    corner = max(2, min(height, width) // 8)
    corners = np.concatenate(
        [dark[:corner, :corner].ravel(), dark[:corner, -corner:].ravel(), dark[-corner:, :corner].ravel(), dark[-corner:, -corner:].ravel()]
    )
    crop = grey[top:bottom, left:right]
    mirrored = crop[:, ::-1]
    if crop.std() > 1e-6:
        symmetry = float(np.corrcoef(crop.ravel(), mirrored.ravel())[0, 1])
    else:
        symmetry = 1.0
    gx = np.abs(np.diff(grey, axis=1))
    gy = np.abs(np.diff(grey, axis=0))
    edge = float(gx.mean() + gy.mean())
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
        float(-(nonzero * np.log2(nonzero)).sum()),
        threshold,
        body_area / grey.size if rows.size else 0.0,
        body_area / (box_w * box_h) if rows.size else 0.0,
        float(np.log(box_w / box_h)),
        lung_area / body_area,
        float(_erode(lungs, 2).sum()) / body_area,
        min(left_lung, right_lung) / max(1, left_lung, right_lung),
        1.0 - central / max(1, lung_area),
        float(grey[lungs].mean()) if lung_area else 1.0,
        float(grey[body & foreground].mean()) if (body & foreground).any() else 0.0,
        float(dark[outside].mean()) if outside.any() else 0.0,
        float(corners.mean()),
        symmetry,
        edge,
        float(laplacian.mean()) / max(edge, 1e-6),
        colour,
    ]
    return np.asarray(values, dtype=np.float64)


# -- rules: what no chest CT slice looks like ------------------------------------------------

COLOUR_LIMIT = 0.12  # figures cut from papers carry coloured arrows and letters, never this much
NOISE_LIMIT = 1.6  # mean |Laplacian| / mean gradient; smooth anatomy stays well below
LUNG_CORE_MIN = 0.01  # solid dark area enclosed by the body, share of the body; lungs are far above


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
