"""The accuracy gate: every converted format is scored like the Pi scores it and compared with
the Keras float model it came from; a conversion that loses accuracy is refused.

Each format runs through :class:`device.core.classifier.Classifier` (the Pi's code path:
quantize the uint8 slice, invoke, dequantize, threshold) on slices preprocessed once by
:func:`device.core.preprocess.load_slice`; the figures come from :mod:`device.core.metrics`. The gate
is decided on val; the training slices not used for calibration are scored too, because
on 118 val slices one flipped label is already 0.85 points of agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from convert.calibration import Slices
from device.core.classifier import Classifier
from device.core.metrics import binary_metrics, source_metrics

GATED_SPLIT = "val"


@dataclass(frozen=True)
class GateRule:
    """What a format must keep relative to the Keras float model on the gated split."""

    min_agreement: float  # share of slices given the same label as Keras
    max_auc_change: float  # |ROC AUC - Keras ROC AUC|


GATE_RULES = {
    "int8": GateRule(min_agreement=0.98, max_auc_change=0.01),
    # float16 rounds the weights, a quantization too; float32 and ONNX should be near-identical
    # (a flip of one borderline slice out of 118 is summation order).
    "float16": GateRule(min_agreement=0.98, max_auc_change=0.01),
    "float32": GateRule(min_agreement=0.99, max_auc_change=0.002),
    "onnx": GateRule(min_agreement=0.99, max_auc_change=0.002),
}

ADVICE = {
    "int8": (
        "int8 calibration lost accuracy. Try, in this order: more calibration slices "
        "(--calibration-samples 400, or all of train); per-channel weights (drop --per-tensor) and bias "
        "correction (drop --no-bias-correction); "
        "more ops kept in float (--float-fallback N; 'auto' stops at a quarter of them); "
        "a float model: convert without int8 (--formats float16,float32,onnx; float16 becomes the "
        "bundle's default). Also check that DATA/train is the data the model was trained on."
    ),
    "float16": "float16 differs from Keras more than rounding explains: leave it out (--formats) and report it.",
    "float32": "float32 TFLite differs from Keras: a converter bug or a layer it does not support; report it.",
    "onnx": "ONNX differs from Keras: try another opset (--onnx-opset) or leave it out (--formats).",
}


def _clean(value):
    """NaN to None so the manifest stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def keras_probabilities(model, slices: Slices, batch_size: int = 16) -> np.ndarray:
    """The float reference: ``N x labels`` probabilities from the Keras model."""
    if not len(slices.pixels):
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.asarray(model.predict(slices.pixels.astype(np.float32), batch_size=batch_size, verbose=0), np.float32)


def score_format(classifier: Classifier, slices: Slices, description: str) -> tuple[np.ndarray, list[str]]:
    """Positive-class probabilities and labels, one ``Classifier.predict_pixels`` per slice."""
    from tqdm import tqdm

    positive, labels = [], []
    for pixels in tqdm(slices.pixels, desc=description, unit="slice", leave=False):
        prediction = classifier.predict_pixels(pixels)
        positive.append(prediction.positive_probability)
        labels.append(prediction.label)
    return np.array(positive, dtype=np.float64), labels


def _figures(y_true, positive, threshold: float, sources) -> dict:
    """binary_metrics, with per-source figures under ``sources`` when there are several."""
    if sources is None or len(set(sources)) < 2:
        return binary_metrics(y_true, positive, threshold)
    figures = source_metrics(y_true, positive, np.asarray(sources), threshold)
    figures.pop("ece"), figures.pop("worst_source_auc")
    return figures


def reference_figures(classifier: Classifier, slices: Slices, reference: np.ndarray, sources=None) -> tuple[dict, list[str]]:
    """Keras float metrics with the bundle's threshold and decision rule, and its labels
    (``sources``: a source name per slice, for figures per source too)."""
    labels = [classifier.decide(row)[0] for row in reference]
    positive = reference[:, classifier.bundle.positive_index].astype(np.float64)
    y_true = slices.y_true(classifier.bundle.positive_label)
    return _clean(_figures(y_true, positive, classifier.threshold, sources)), labels


def format_figures(
    classifier: Classifier,
    slices: Slices,
    reference: np.ndarray,
    reference_labels: list[str],
    description: str,
    sources=None,
) -> dict:
    """Metrics of one format on one split, plus its distance from Keras: label agreement and
    max/mean |delta P(positive)|."""
    positive, labels = score_format(classifier, slices, description)
    reference_positive = reference[:, classifier.bundle.positive_index].astype(np.float64)
    y_true = slices.y_true(classifier.bundle.positive_label)
    delta = np.abs(positive - reference_positive)
    figures = _figures(y_true, positive, classifier.threshold, sources)
    agree = np.array([a == b for a, b in zip(labels, reference_labels, strict=True)])
    figures["agreement"] = float(agree.mean()) if labels else float("nan")
    for name, per_source in figures.get("sources", {}).items():
        member = np.asarray(sources) == name
        per_source["agreement"] = float(agree[member].mean())
        per_source["max_abs_delta"] = float(delta[member].max())
    figures["max_abs_delta"] = float(delta.max()) if delta.size else float("nan")
    figures["mean_abs_delta"] = float(delta.mean()) if delta.size else float("nan")
    return _clean(figures)


def check(figures: dict, keras: dict, fmt: str, rules: dict[str, GateRule] = GATE_RULES) -> list[str]:
    """Reasons ``fmt`` fails the gate on the gated split (empty when it passes)."""
    rule = rules[fmt]
    got, ref = figures[GATED_SPLIT], keras[GATED_SPLIT]
    reasons = []
    if got["agreement"] is None or got["agreement"] < rule.min_agreement:
        reasons.append(
            f"{fmt}: agrees with Keras on {got['agreement']:.1%} of {GATED_SPLIT} slices "
            f"(needs {rule.min_agreement:.0%})"
        )
    if got["auc"] is not None and ref["auc"] is not None and abs(got["auc"] - ref["auc"]) > rule.max_auc_change:
        reasons.append(
            f"{fmt}: ROC AUC {got['auc']:.4f} vs Keras {ref['auc']:.4f} on {GATED_SPLIT} "
            f"(allowed difference {rule.max_auc_change})"
        )
    return reasons


def rules_manifest(formats) -> dict:
    return {"split": GATED_SPLIT, **{fmt: asdict(GATE_RULES[fmt]) for fmt in formats}}
