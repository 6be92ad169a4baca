"""A bundle made runnable: preprocessing + backend + labels + threshold, built once per process.

Every consumer (CLI, watch daemon, UI, bench) predicts through :class:`Classifier`, so a
prediction always says which model (sha256) made it and is thresholded by the bundle's own
threshold.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from device.core.backends import Backend, BackendError, default_threads, dequantize, open_backend, quantize
from device.core.band import UNCERTAIN, Band
from device.core.bundle import Bundle, BundleError, load_bundle
from device.core.calibration import Calibration
from device.core.guard import Guard, load_guard
from device.core.preprocess import DecodedSlice, Source, crop_box, decode_slice, prepare


@dataclass(frozen=True)
class Prediction:
    label: str
    positive_probability: float
    probabilities: dict[str, float]
    threshold: float
    model_sha256: str
    latency_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, invoke, total
    uncertain_band: list[float] | None = None  # [low, high) of calibrated P where the label is "uncertain"
    bundle_sha256: str = ""  # the bundle's identity: manifest (threshold, labels, band, ...) and files together

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier:
    """Runs one format of one bundle. Construct once (model load is the slow part)."""

    def __init__(
        self,
        bundle: Bundle | str,
        fmt: str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        guard: bool = True,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        # the input guard (device.core.guard): None when switched off or the bundle predates guards
        self.guard: Guard | None = load_guard(self.bundle) if guard else None
        self.format = fmt or self.bundle.default_format
        info = self.bundle.format_info(self.format)
        self.threads = threads or default_threads()
        self.sha256 = self.bundle.sha256(self.format)
        self.bundle_sha256 = self.bundle.digest
        self.backend: Backend = open_backend(self.bundle.model_path(self.format), info["runtime"], self.threads, backend)
        spec = self.bundle.spec
        expected = (1, spec.height, spec.width, spec.channels)
        if tuple(self.backend.input.shape) != expected:
            raise BundleError(
                f"bundle {self.bundle.path}: model input is {self.backend.input.shape} but the manifest's "
                f"preprocessing produces {expected}; the bundle is inconsistent, rebuild it"
            )
        if self.backend.output.shape[-1] != len(self.bundle.labels):
            raise BundleError(
                f"bundle {self.bundle.path}: model outputs {self.backend.output.shape[-1]} values but the "
                f"manifest lists {len(self.bundle.labels)} labels"
            )
        try:
            self.calibration = Calibration.from_manifest(self.bundle.manifest.get("calibration"))
            self.bundle_band = Band.from_manifest(self.bundle.manifest.get("uncertain_band"), self.bundle.threshold)
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"bundle {self.bundle.path}: {error}; recalibrate it with `python -m convert.calibrate`") from None
        self.site = None  # a device.core.siteprofile.SiteProfile accepted for this model, see use_site_profile

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    @property
    def calibration_in_use(self) -> Calibration:
        """The map applied after the model: the site profile's (fitted on the site's own slices
        by ``ctpi site-check``) when it has one, else the bundle's (:attr:`calibration`)."""
        site_map = self.site.calibration if self.site is not None else None
        return site_map if site_map is not None else self.calibration

    @property
    def threshold(self) -> float:
        """On the scale of :attr:`calibration_in_use`: the site profile's when one is in use, else the bundle's."""
        return self.site.threshold if self.site is not None else self.bundle.threshold

    @property
    def band(self) -> Band | None:
        """The "uncertain — review" band in use (site profile's, else the bundle's; None: none)."""
        return self.site.band if self.site is not None else self.bundle_band

    def use_site_profile(self, profile) -> None:
        """Decide with a site profile's calibration map, threshold and band (``None``: the bundle's again).
        A profile accepted for another model file is refused (``SiteProfileError``)."""
        if profile is not None:
            profile.check_model(self.sha256)
        self.site = profile

    def raw_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """The model's own output (label order) for one preprocessed ``H x W x C`` uint8 slice,
        before calibration: what ``python -m convert.calibrate`` fits on."""
        tensor = quantize(pixels[None, ...].astype(np.float32), self.backend.input)
        output = dequantize(self.backend.invoke(tensor), self.backend.output)
        return output.reshape(-1)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (label order), the positive one calibrated by the map in use
        (the site profile's, else the bundle's)."""
        return self.calibration_in_use.apply_distribution(self.raw_probabilities(pixels), self.bundle.positive_index)

    def probabilities_batch(self, batch: np.ndarray) -> np.ndarray:
        """``N x H x W x C`` uint8 to ``N x labels`` (one invoke per slice: models have batch 1)."""
        return np.stack([self.probabilities(pixels) for pixels in batch]) if len(batch) else np.zeros((0, len(self.labels)))

    def decide(self, probabilities: np.ndarray) -> tuple[str, float]:
        """Label and positive probability: ``uncertain`` inside the band, else positive iff its
        probability reaches the threshold, otherwise the most probable of the other labels."""
        positive = float(probabilities[self.bundle.positive_index])
        if self.band is not None and self.band.contains(positive):
            return UNCERTAIN, positive
        if positive >= self.threshold:
            return self.bundle.positive_label, positive
        others = [i for i in range(len(self.labels)) if i != self.bundle.positive_index]
        best = max(others, key=lambda i: probabilities[i])
        return self.labels[best], positive

    def predict_pixels(self, pixels: np.ndarray, latency: dict[str, float] | None = None) -> Prediction:
        start = time.perf_counter()
        probabilities = self.probabilities(pixels)
        timings = dict(latency or {})
        timings["invoke"] = (time.perf_counter() - start) * 1000.0
        timings["total"] = sum(timings.values())
        label, positive = self.decide(probabilities)
        return Prediction(
            label=label,
            positive_probability=positive,
            probabilities={name: float(p) for name, p in zip(self.labels, probabilities, strict=False)},
            threshold=self.threshold,
            model_sha256=self.sha256,
            latency_ms={k: round(v, 3) for k, v in timings.items()},
            uncertain_band=self.band.to_manifest() if self.band is not None else None,
            bundle_sha256=self.bundle_sha256,
        )

    def check(self, decoded: DecodedSlice) -> float:
        """Refuse what is not an axial chest CT slice (``BadSliceError`` reason ``not-ct``);
        returns the guard's time in ms. Every path calls it between decoding and scoring."""
        start = time.perf_counter()
        if self.guard is not None:
            self.guard.enforce(decoded)
        return (time.perf_counter() - start) * 1000.0

    def predict(self, source: Source) -> Prediction:
        """File (path or bytes) to prediction; raises ``BadSliceError`` for bad files and,
        with the guard on, for files that are not chest CT slices."""
        start = time.perf_counter()
        decoded = decode_slice(source, self.bundle.spec)
        decoded_at = time.perf_counter()
        crop_box(decoded.pixels, self.bundle.spec)  # preprocessing's body finding, which the guard reuses
        located_at = time.perf_counter()
        guard_ms = self.check(decoded)
        guarded_at = time.perf_counter()
        pixels = prepare(decoded.pixels, self.bundle.spec)
        prepared_at = time.perf_counter()
        preprocess_ms = (located_at - decoded_at + prepared_at - guarded_at) * 1000.0
        return self.predict_pixels(
            pixels, {"decode": (decoded_at - start) * 1000.0, "guard": guard_ms, "preprocess": preprocess_ms}
        )


__all__ = ["Classifier", "Prediction", "BackendError", "BundleError"]
