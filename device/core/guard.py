"""The input guard: is a decoded file an axial chest CT slice? Anything else is refused.

A model scores whatever it is given, so a photo, a screenshot or a head CT would get a
confident COVID/NonCOVID answer. The guard looks at the decoded image before letterboxing
(:class:`device.core.preprocess.DecodedSlice`) and refuses with :class:`BadSliceError` reason
``not-ct`` and a sentence a person can act on.

Three stages, pure numpy (about a millisecond on the x86 build machine). The image stages see
the body, not the frame: :mod:`device.core.guard_body` finds the body's bounding box (less a
scanner table under it and separate labels) and :mod:`device.core.guard_features` computes every
feature on a 64-pixel view of it, so a slice cropped tight to the body and one in a PACS
export's square frame of air are judged alike.

0. **The DICOM header**, when there is one: a Modality other than CT (MR, CR, DX, US, MG...),
   an ImageOrientationPatient that is not axial (coronal or sagittal reconstructions), or a
   BodyPartExamined that is clearly not the chest (HEAD, ABDOMEN, PELVIS...) is refused at
   once with a sentence saying so. A header that says "axial chest CT" still goes through the
   image checks: a chest series also holds neck and upper-abdomen slices.
1. **Rules** for the obvious: colour images (photos, histology, fundus, dermatoscopy,
   screenshots), flat images, noise, pages with a light background (scanned documents,
   screenshots), and images with no dark, air-filled lungs enclosed by a brighter body.
2. **A learned acceptance region** (``guard.json`` in the bundle, fitted at conversion time by
   ``python -m convert.guard`` on the bundle's training slices, as they are and re-framed):
   Gaussians over :data:`FEATURE_NAMES` (shape of the body, the lungs on both sides of the
   midline, the chest wall, histogram, texture), a few per training source. A slice whose
   Mahalanobis distance to every Gaussian exceeds that Gaussian's threshold is refused as
   unlike any CT slice the model was trained on. ``guard.json`` is listed with its sha256 in the manifest, so an edited guard
   is refused by :func:`device.core.bundle.load_bundle` like an edited model.

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

from device.core.guard_features import FEATURE_NAMES, FEATURE_VERSION, features
from device.core.preprocess import BadSliceError, DecodedSlice

log = logging.getLogger(__name__)

GUARD_FILE = "guard.json"
GUARD_SCHEMA = "ctpi.guard/1"
REASON = "not-ct"


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one image: ``accepted``, a short ``check`` name for logs and a
    ``message`` a person can act on when refused."""

    accepted: bool
    check: str
    message: str = ""
    distance: float | None = None


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


_ENTROPY, _COLOUR, _NOISE, _LUNG_CORE = (
    FEATURE_NAMES.index(name) for name in ("histogram_entropy", "colour_fraction", "noise_ratio", "lung_core")
)
FLAT_RANGE = 1e-3  # intensity range under which an image is flat
_RANGE_SAMPLE = 16  # the flat rule first looks at every 16th pixel of every 16th row


def is_flat(pixels: np.ndarray) -> bool:
    """Whether the image's intensity range (max - min) is under FLAT_RANGE.

    A sparse sample decides for any image with structure: its range can only be smaller than
    the whole image's (and a rounded difference no larger), so a sample already spread by
    FLAT_RANGE settles it without the two passes over every pixel that cost 5 % of the guard."""
    sample = pixels[::_RANGE_SAMPLE, ::_RANGE_SAMPLE]
    if float(sample.max() - sample.min()) >= FLAT_RANGE:
        return False
    return float(pixels.max() - pixels.min()) < FLAT_RANGE


def rule_verdict(values: np.ndarray, decoded: DecodedSlice) -> Verdict | None:
    """A refusal for the obvious cases, or None when the rules see nothing wrong."""
    if values[_ENTROPY] < 0.5 or is_flat(decoded.pixels):
        return Verdict(False, "flat", "is a flat image with no structure, not a CT slice")
    if values[_COLOUR] > COLOUR_LIMIT:
        return Verdict(
            False, "colour", "looks like a colour photograph or illustration, not a CT slice (CT slices are grey)"
        )
    if values[_NOISE] > NOISE_LIMIT:
        return Verdict(False, "noise", "looks like random noise or a fine pattern, not a CT slice")
    if values[_LUNG_CORE] < LUNG_CORE_MIN:
        return Verdict(
            False,
            "no-lungs",
            "shows no dark lungs inside a body outline: not an axial chest CT slice (head or abdominal CT, X-ray, or another image?)",
        )
    return None


# -- the learned acceptance region ------------------------------------------------------------


@dataclass(frozen=True)
class SourceModel:
    """One Gaussian over the features (a training source, or one of its components), and the
    distance it accepts."""

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
        # every Gaussian at once (one einsum per slice, not a loop of matrix products)
        self._means = np.stack([s.mean for s in sources]) if sources else None
        self._scaled_precisions = np.stack([s.precision / s.threshold for s in sources]) if sources else None

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
        """Squared Mahalanobis distance to each Gaussian, divided by its threshold (<= 1 accepts)."""
        delta = values[None, :] - self._means
        return np.einsum("ij,ijk,ik->i", delta, self._scaled_precisions, delta).tolist()

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
    :func:`device.core.bundle.load_bundle`."""
    if GUARD_FILE not in bundle.manifest.get("files", {}):
        log.warning(
            "bundle %s carries no input guard (%s): every image that decodes will be scored; "
            "fit one with `python -m convert.guard --bundle %s --data DATA`",
            bundle.path,
            GUARD_FILE,
            bundle.path,
        )
        return None
    from device.core.bundle import BundleError

    path = Path(bundle.path) / GUARD_FILE
    try:
        return Guard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"bundle {bundle.path}: {GUARD_FILE} cannot be used: {error}") from None
