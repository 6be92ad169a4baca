"""Calibrated probabilities: Platt (or temperature) scaling of the model's positive logit.

A softmax output of 0.98 does not mean that 98 % of such slices are positive; on slices
from another hospital it may mean much less. The bundle's ``manifest.json`` therefore carries
a monotone map, fitted on labelled validation slices by ``python -m convert.calibrate``::

    P_calibrated = sigmoid(a * logit(P_model) + b)      (a > 0)

``temperature`` fixes ``b = 0`` (``a = 1 / T``). The map is applied on the device side by
:class:`device.core.classifier.Classifier`, after the model, so every format (int8 included) gets
it without touching the model files. Because ``a > 0`` the map is strictly increasing: it
changes no ranking (ROC AUC) and, with the threshold carried through the same map, no
decision. numpy only: fitting and ECE are shared by conversion and ``ctpi site-check``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.core.metrics import expected_calibration_error, reliability_bins

METHODS = ("platt", "temperature")
# int8 outputs are multiples of 1/256 and reach exactly 0: clip before the logit so such a
# slice gets a finite (very confident) logit instead of -inf.
PROBABILITY_FLOOR = 1e-7


class CalibrationError(ValueError):
    """Calibration cannot be fitted (one class only, or a map that would reverse the ranking)."""


def logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return np.log(p) - np.log1p(-p)


def sigmoid(values) -> np.ndarray:
    z = np.asarray(values, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


@dataclass(frozen=True)
class Calibration:
    """``sigmoid(a * logit(p) + b)``; the identity (``a = 1, b = 0``) when a bundle has none."""

    method: str = "identity"
    a: float = 1.0
    b: float = 0.0

    @property
    def identity(self) -> bool:
        return self.method == "identity"

    def apply(self, positive_probability):
        """Calibrated positive probability (scalar in, float out; array in, array out)."""
        if self.identity:
            return positive_probability
        calibrated = sigmoid(self.a * logit(positive_probability) + self.b)
        return float(calibrated) if np.ndim(positive_probability) == 0 else calibrated

    def apply_distribution(self, probabilities: np.ndarray, positive_index: int) -> np.ndarray:
        """A model's class probabilities with the positive one calibrated and the others
        rescaled to share the rest (two labels: ``1 - P``)."""
        if self.identity:
            return probabilities
        raw = np.asarray(probabilities, dtype=np.float64)
        positive = float(self.apply(float(raw[positive_index])))
        others = np.delete(raw, positive_index)
        total = others.sum()
        others = others / total * (1.0 - positive) if total > 0 else np.full(others.shape, (1.0 - positive) / max(len(others), 1))
        return np.insert(others, positive_index, positive).astype(np.float32)

    @classmethod
    def from_manifest(cls, entry: dict | None) -> Calibration:
        if not entry:
            return cls()
        method = entry.get("method")
        if method == "identity":  # calibrated and found better left alone (convert.calibrate's auto rule)
            return cls()
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r} is not one of {METHODS}")
        a, b = float(entry["a"]), float(entry["b"])
        if not (np.isfinite(a) and np.isfinite(b) and a > 0):
            raise ValueError(f"calibration a={a}, b={b}: a must be a positive finite number")
        return cls(method, a, b)


def fit(positive_probabilities, y_true, method: str = "platt", weights=None, iterations: int = 100) -> Calibration:
    """Fit the map by maximum likelihood (Newton's method on the log loss, with step halving).

    Targets are Platt's smoothed labels (``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``), so a
    model that separates the slices perfectly gets a finite, confident map instead of an
    ever-steeper one. ``weights`` (one per slice) lets every source count equally however many
    slices it has. A fit whose slope is not positive would reverse the model's ranking; it is
    refused."""
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    y = np.asarray(y_true, dtype=np.float64).ravel()
    z = logit(positive_probabilities).ravel()
    if y.shape != z.shape:
        raise CalibrationError(f"{y.size} labels but {z.size} probabilities")
    if y.min() == y.max():
        raise CalibrationError("calibration needs validation slices of both classes")
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    w = w / w.sum() * len(w)
    positives, negatives = float(y.sum()), float((1 - y).sum())
    y = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    # design: [z, 1] for platt, [z] for temperature
    design = np.stack([z, np.ones_like(z)], axis=1) if method == "platt" else z[:, None]
    theta = np.array([1.0, 0.0]) if method == "platt" else np.array([1.0])

    def loss(params):
        margin = design @ params
        return float(np.sum(w * (np.logaddexp(0.0, margin) - y * margin)))

    current = loss(theta)
    for _ in range(iterations):
        p = sigmoid(design @ theta)
        gradient = design.T @ (w * (p - y))
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6:
            candidate = theta - scale * step
            value = loss(candidate)
            if value <= current:
                break
            scale /= 2
        else:
            break
        converged = current - value < 1e-12
        theta, current = candidate, value
        if converged:
            break
    a = float(theta[0])
    b = float(theta[1]) if method == "platt" else 0.0
    if not (np.isfinite(a) and a > 0):
        raise CalibrationError(
            f"the fitted slope is {a:.4g}: on these slices the model's probability does not increase with the "
            "positive label, so calibration would reverse its ranking; check the data folders' labels"
        )
    return Calibration(method, a, b)


def calibration_report(y_true, probabilities, bins: int = 10) -> dict:
    """ECE and reliability bins of ``probabilities`` (what the model card and page draw), with
    the ECE that a perfectly calibrated model would show on the same slices
    (:func:`ece_if_calibrated`), so a reader can tell miscalibration from sampling noise."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    ece = expected_calibration_error(y, p, bins)
    return {
        "n": int(y.size),
        "ece": ece,
        "ece_if_calibrated": ece_if_calibrated(p, ece, bins),
        "bins": [{k: _plain(v) for k, v in row.items()} for row in reliability_bins(y, p, bins)],
    }


def ece_if_calibrated(probabilities, measured: float | None = None, bins: int = 10, draws: int = 2000,
                      seed: int = 0) -> dict:
    """The ECE of a perfectly calibrated model on these slices: labels drawn as Bernoulli(P)
    for the same P, ``draws`` times (seeded, so a report is reproducible).

    Why: ECE is biased upwards on small samples. On 118 slices (COVID-CT's val) a model whose
    P is exactly right still shows an ECE of about 0.08 over 10 bins, so an ECE target below
    that cannot be met or judged there. ``median`` and the 90 % range ``low``-``high`` give
    the noise floor; ``p_value`` (with ``measured``) is the share of draws at least as large
    as the measured ECE: a small value means real miscalibration, not noise."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if p.size == 0:
        return {"median": None, "low": None, "high": None, "p_value": None, "draws": 0}
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    members = np.eye(bins)[index]  # slices x bins
    counts = members.sum(axis=0)
    confidence = np.divide(p @ members, counts, out=np.zeros(bins), where=counts > 0)
    rng = np.random.default_rng(seed)
    eces = np.empty(draws)
    for start in range(0, draws, 250):  # bounded memory: 250 x slices labels at a time
        labels = (rng.random((min(250, draws - start), p.size)) < p).astype(np.float64)
        rate = np.divide(labels @ members, counts, out=np.zeros((len(labels), bins)), where=counts > 0)
        eces[start : start + len(labels)] = (np.abs(rate - confidence) * counts).sum(axis=1) / p.size
    low, median, high = np.quantile(eces, [0.05, 0.5, 0.95])
    p_value = None if measured is None else float(np.mean(eces >= measured - 1e-12))
    return {"median": float(median), "low": float(low), "high": float(high), "p_value": p_value, "draws": draws}


def ece_floor_text(report: dict) -> str | None:
    """``median (low-high), p = ...`` of a report's :func:`ece_if_calibrated`, or None (older
    manifests lack it): the one wording the model card and ``ctpi site-check`` print."""
    floor = report.get("ece_if_calibrated") or {}
    if floor.get("median") is None:
        return None
    p_value = f", p = {floor['p_value']:.2f}" if floor.get("p_value") is not None else ""
    return f"{floor['median']:.3f} ({floor['low']:.3f}-{floor['high']:.3f}){p_value}"


def _plain(value):
    """A JSON-safe number: NaN (an empty bin) becomes None, floats are rounded."""
    if isinstance(value, float):
        return None if not np.isfinite(value) else round(value, 6)
    return value
