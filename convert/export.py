"""One Keras model to the bytes of every requested bundle format, plus what the manifest must
say about each (the ONNX opset, the int8 calibration). The one place that knows which
converter makes which format, used by ``python -m convert`` and the test fixtures alike."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from convert.onnx_export import ONNX_OPSET, onnx_opset, to_onnx
from convert.tflite import TFLITE_FORMATS, to_tflite
from device.core.bundle import FORMATS

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("int8", "float16", "float32", "onnx")


def parse_formats(text: str) -> list[str]:
    """``"int8,onnx"`` to ``["int8", "onnx"]``, refusing unknown or repeated names."""
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown formats {unknown or text!r}; choose from {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise ValueError(f"format listed twice in {text!r}")
    return formats


def export_formats(
    model,
    formats: Sequence[str],
    representative: Sequence[np.ndarray] | None = None,
    *,
    per_channel: bool = True,
    opset: int = ONNX_OPSET,
    int8_model=None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, bytes], dict[str, dict]]:
    """``({format: model bytes}, {format: manifest extras})``.

    ``representative`` are ``H x W x C`` uint8 slices from the training split (int8 only);
    ``int8_model``, when given, is what int8 converts instead of ``model`` (a bias-corrected
    copy, see :mod:`convert.bias_correction`). The extras record how each file was made, so a
    bundle explains its own quantization."""
    models: dict[str, bytes] = {}
    extras: dict[str, dict] = {}
    for fmt in formats:
        if on_step:
            on_step(f"converting to {fmt}")
        if fmt in TFLITE_FORMATS:
            if fmt == "int8":
                source = model if int8_model is None else int8_model
                models[fmt] = to_tflite(source, fmt, representative, per_channel=per_channel)
                extras[fmt] = {
                    "quantization": "full-integer int8 (weights, activations, input and output)",
                    "weights": "per-channel" if per_channel else "per-tensor",
                    "bias_correction": int8_model is not None,
                    "calibration_samples": len(representative or ()),
                }
            else:
                models[fmt] = to_tflite(model, fmt, per_channel=per_channel)
                float16 = {"quantization": "float16 weights, float32 activations"}
                extras[fmt] = float16 if fmt == "float16" else {"quantization": None}
        elif fmt == "onnx":
            models[fmt] = to_onnx(model, opset)
            extras[fmt] = {"opset": onnx_opset(models[fmt]), "quantization": None}
        else:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        log.info("%s: %d bytes", fmt, len(models[fmt]))
    return models, extras
