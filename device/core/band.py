"""The "uncertain — review" band: calibrated probabilities too close to the threshold to call.

A slice whose calibrated P(positive) lies in ``[low, high)`` (with ``low <= threshold <=
high``) is labelled :data:`UNCERTAIN` instead of positive or negative; outside the band the
threshold decides as before. The band is chosen on validation slices by
:func:`choose_band` and recorded in the bundle's ``manifest.json`` as ``uncertain_band``
(a site profile may replace it, see :mod:`device.core.siteprofile`). A study with an uncertain slice
and no positive one gets the verdict :data:`REVIEW` (:mod:`device.core.studies`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNCERTAIN = "uncertain"  # the slice label: machine-friendly, stored in the journal
UNCERTAIN_DISPLAY = "uncertain — review"  # what people read
REVIEW = "review"  # the study verdict when an uncertain slice and no positive one
MAX_FRACTION = 0.10
TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class Band:
    low: float
    high: float

    def __post_init__(self):
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ValueError(f"uncertain band [{self.low}, {self.high}] is not an interval of probabilities")

    def contains(self, probability: float) -> bool:
        return self.low <= probability < self.high

    def to_manifest(self) -> list[float]:
        return [float(self.low), float(self.high)]

    @classmethod
    def from_manifest(cls, value, threshold: float | None = None) -> Band | None:
        """``[low, high]`` from a manifest or site profile (None or empty: no band)."""
        if not value:
            return None
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"uncertain_band {value!r} is not a pair [low, high]") from None
        band = cls(low, high)
        if threshold is not None and not low <= threshold <= high:
            raise ValueError(f"uncertain_band [{low}, {high}] does not contain the threshold {threshold}")
        return band


def display_label(label: str | None) -> str | None:
    """A stored label as people read it (``uncertain`` becomes ``uncertain — review``)."""
    return UNCERTAIN_DISPLAY if label == UNCERTAIN else label


def band_figures(y_true, probabilities, threshold: float, band: Band | None) -> dict:
    """How many slices fall in the band and how accurate the threshold is outside it."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    inside = (p >= band.low) & (p < band.high) if band is not None else np.zeros(p.shape, bool)
    outside = ~inside
    correct = ((p >= threshold).astype(np.int64) == y) & outside
    return {
        "n": int(y.size),
        "in_band": int(inside.sum()),
        "fraction_in_band": float(inside.mean()) if y.size else float("nan"),
        "n_outside": int(outside.sum()),
        "accuracy_outside": float(correct.sum() / outside.sum()) if outside.any() else float("nan"),
        "accuracy_all": float(((p >= threshold).astype(np.int64) == y).mean()) if y.size else float("nan"),
    }


def _edges(scores: np.ndarray, threshold: float, below: bool, limit: int) -> list[float]:
    """Candidate band edges on one side of the threshold: the threshold itself, then midpoints
    between consecutive distinct scores moving away from it (each takes in one more score),
    at most ``limit`` scores in."""
    side = np.unique(scores[scores < threshold])[::-1] if below else np.unique(scores[scores >= threshold])
    edges, taken = [float(threshold)], 0
    for index, score in enumerate(side):
        taken += int((scores == score).sum())
        if taken > limit:
            break
        following = side[index + 1] if index + 1 < len(side) else (0.0 if below else 1.0)
        edges.append(float((score + following) / 2.0) if index + 1 < len(side) else float(following))
    return edges


def choose_band(
    sources: dict[str, tuple],
    threshold: float,
    max_fraction: float = MAX_FRACTION,
    target_accuracy: float = TARGET_ACCURACY,
) -> tuple[Band, dict]:
    """The band from validation slices of one or more sources (``{name: (y_true, calibrated)}``).

    Rule: among bands holding at most ``max_fraction`` of the slices of **every** source, take
    the narrowest (fewest pooled slices) whose accuracy outside reaches ``target_accuracy`` on
    every source; if none does, the one with the best worst-source accuracy outside (ties: the
    narrower). Edges sit halfway between validation scores, like the threshold. Returns the
    band and its figures per source and pooled."""
    arrays = {name: (np.asarray(y, np.int64), np.asarray(p, np.float64)) for name, (y, p) in sources.items()}
    pooled = np.concatenate([p for _, p in arrays.values()])
    limit = int(np.floor(max_fraction * len(pooled)))
    lows = _edges(pooled, threshold, below=True, limit=limit)
    highs = _edges(pooled, threshold, below=False, limit=limit)
    best_key, best = None, Band(threshold, threshold)
    for low in lows:
        for high in highs:
            band = Band(min(low, threshold), max(high, threshold))
            worst, fractions_ok, inside_total = 1.0, True, 0
            for y, p in arrays.values():
                figures = band_figures(y, p, threshold, band)
                inside_total += figures["in_band"]
                if figures["fraction_in_band"] > max_fraction:
                    fractions_ok = False
                    break
                worst = min(worst, figures["accuracy_outside"])
            if not fractions_ok:
                continue
            reaches = worst >= target_accuracy
            key = (reaches, -inside_total, worst) if reaches else (reaches, worst, -inside_total)
            if best_key is None or key > best_key:
                best_key, best = key, band
    figures = {name: band_figures(y, p, threshold, best) for name, (y, p) in arrays.items()}
    if len(arrays) > 1:
        figures["pooled"] = band_figures(
            np.concatenate([y for y, _ in arrays.values()]), pooled, threshold, best
        )
    return best, {
        "rule": f"narrowest band with at most {max_fraction:.0%} of each source's val slices inside and accuracy outside "
        f">= {target_accuracy} on every source; else the best worst-source accuracy outside",
        "reached_target": bool(best_key[0]) if best_key else False,
        "figures": figures,
    }
