"""Keras model to TFLite flatbuffers: full-integer int8, float16 and float32.

Keras 3 models go through a ``tf.function`` with an explicit ``[1, H, W, C]`` float32 input
signature (the converter's Keras entry point is unreliable with Keras 3), so the exported
model has a fixed batch of one, the shape the Pi runs.

int8 is *full-integer*: int8 weights and activations and int8 input/output tensors, with
``TFLITE_BUILTINS_INT8`` only, so a model that would silently keep float ops fails to
convert instead. The representative data are preprocessed slices (uint8 pixels as float32,
exactly what the model sees at run time).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tensorflow as tf

TFLITE_FORMATS = ("int8", "float16", "float32")


def frozen_function(model):
    """``model`` as a concrete function on ``[1, H, W, C]`` float32 pixels with its variables
    folded into constants. Both the TFLite converter and tf2onnx take this; Keras 3 models
    through the converter's Keras or SavedModel entry points can keep resource variables
    that int8 calibration then cannot read."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = [1, *model.input_shape[1:]]
    function = tf.function(lambda pixels: model(pixels, training=False)).get_concrete_function(
        tf.TensorSpec(shape, tf.float32, name="pixels")
    )
    return convert_variables_to_constants_v2(function)


def to_tflite(
    model,
    fmt: str,
    representative: Iterable[np.ndarray] | None = None,
    per_channel: bool = True,
) -> bytes:
    """Convert ``model`` to a TFLite flatbuffer in ``fmt`` (int8 needs ``representative``:
    ``H x W x C`` uint8 slices from the training split)."""
    if fmt not in TFLITE_FORMATS:
        raise ValueError(f"unknown TFLite format {fmt!r}; choose one of {TFLITE_FORMATS}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_function(model)])
    return _configure(converter, fmt, representative, per_channel).convert()


def _configure(converter, fmt, representative, per_channel):
    if fmt == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "int8":
        if representative is None:
            raise ValueError("int8 conversion needs representative slices for calibration")
        samples = [np.asarray(s, dtype=np.float32)[None, ...] for s in representative]
        if not samples:
            raise ValueError("int8 conversion needs at least one representative slice")

        def dataset():
            for sample in samples:
                yield [sample]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        if not per_channel:
            converter._experimental_disable_per_channel = True  # per-tensor weights, for comparison
    return converter


def to_weights_only_int8(model) -> bytes:
    """Dynamic-range model (int8 weights, float activations): not a bundle format, a probe.
    When it loses as much accuracy as full-integer int8, the model's weights are what is
    fragile and no calibration can fix it; when it does not, the activations are."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_function(model)])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()
