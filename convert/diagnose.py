"""Why int8 failed the gate: is it the weights or the activations?

Full-integer int8 rounds both. A dynamic-range model rounds only the weights (to int8,
per channel, as full-integer does) and keeps float activations. Scoring it beside the failed
int8 model tells the user which remedy can work: calibration options only help the
activations; fragile weights need a change in training (fewer unfrozen layers, stronger
weight decay) or a float model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from convert.calibration import Slices
from convert.tflite import to_weights_only_int8
from device.core.backends import default_threads, dequantize, open_backend, quantize
from device.core.classifier import Classifier


def tflite_probabilities(content: bytes, pixels: np.ndarray) -> np.ndarray:
    """``N x labels`` probabilities of a TFLite model given as bytes, run as the Pi runs it."""
    with tempfile.TemporaryDirectory(prefix="ctpi-probe-") as scratch:
        path = Path(scratch) / "probe.tflite"
        path.write_bytes(content)
        backend = open_backend(path, "tflite", default_threads())
        return np.stack(
            [
                dequantize(backend.invoke(quantize(one[None].astype(np.float32), backend.input)), backend.output).reshape(-1)
                for one in pixels
            ]
        )


def weights_only_agreement(model, referee: Classifier, slices: Slices, reference: np.ndarray) -> dict:
    """Label agreement with Keras and max/mean |delta P(positive)| of the int8-weights probe."""
    probabilities = tflite_probabilities(to_weights_only_int8(model), slices.pixels)
    labels = [referee.decide(row)[0] for row in probabilities]
    reference_labels = [referee.decide(row)[0] for row in reference]
    index = referee.bundle.positive_index
    delta = np.abs(probabilities[:, index] - reference[:, index])
    return {
        "agreement": float(np.mean([a == b for a, b in zip(labels, reference_labels, strict=True)])),
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
    }


OUTPUT_STEPS_NEEDED = 8  # output quantization steps between the threshold and 0 or 1


def threshold_resolution(threshold: float, output_step: float | None) -> str | None:
    """Why no int8 model can keep the labels when the threshold sits on the coarse end of the
    int8 output grid (softmax outputs are quantized in steps of 1/256)."""
    if not output_step:
        return None
    margin = min(threshold, 1.0 - threshold)
    if margin >= OUTPUT_STEPS_NEEDED * output_step:
        return None
    return (
        f"The decision threshold {threshold:.4f} is {margin / output_step:.1f} output steps from the end of "
        f"the int8 probability grid (step {output_step:.5f}): slices near it collapse onto the same few "
        "int8 values, which costs label agreement and ties in the ROC AUC whatever the calibration. "
        "Such a threshold comes from an over- or under-confident model (see the run's ECE); "
        "retrain or recalibrate it, or ship a float model."
    )


def explain(probe: dict, int8_agreement: float, min_agreement: float, resolution: str | None = None) -> str:
    figures = (
        f"int8 weights with float activations agree with Keras on {probe['agreement']:.1%} of val slices "
        f"(max |Δp| {probe['max_abs_delta']:.3f}, mean {probe['mean_abs_delta']:.4f}); full-integer int8 "
        f"on {int8_agreement:.1%}."
    )
    if resolution:
        return f"{figures} {resolution}"
    if probe["agreement"] < min_agreement:
        return (
            figures + " The weights alone already lose the agreement: the model is fragile to 8-bit "
            "weight rounding, so more calibration slices will not help. Retrain with fewer unfrozen layers "
            "or stronger weight decay, or ship a float model (--formats float16,float32,onnx)."
        )
    return (
        figures + " The weights survive 8-bit rounding, so the activation ranges are the problem: "
        "more or more varied calibration slices should help."
    )
