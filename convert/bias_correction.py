"""Bias correction for int8: undo the mean output shift that 8-bit weight rounding causes.

Rounding a layer's weights to int8 changes its output by ``(W_q - W) x``; the zero-mean part
of that error averages out in global pooling, but its mean, ``(W_q - W) E[x]``, is a
systematic shift per output channel that passes straight to the classifier. Fine-tuned
MobileNetV2s here lose 6 to 7 points of label agreement to it with int8 weights alone (see
``convert.diagnose``). Following Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV 2019, empirical variant), ``E[x]`` is measured on
the calibration slices and the shift is subtracted from the layer's bias, or added to the
moving mean of the BatchNormalization that follows a bias-free convolution.

Weight rounding is simulated as TFLite does it: symmetric, ``[-127, 127]``, one scale per
output channel (or per tensor with ``per_channel=False``). Folding a BatchNormalization
into the kernel scales whole output channels, which does not change which way a weight
rounds, so the simulation holds for the folded kernels the converter actually rounds.

Only the copy converted to int8 is corrected; the float formats and the gate's Keras
reference stay the trained model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _is_weighted(layer) -> bool:
    import keras

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return True
    if isinstance(layer, keras.layers.Conv2D):
        return layer.groups == 1
    return isinstance(layer, keras.layers.Dense)


def round_like_tflite(kernel: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """``kernel`` rounded to symmetric int8 and scaled back, per ``channel_axis`` (or per tensor)."""
    if channel_axis is None:
        peak = np.max(np.abs(kernel))
    else:
        axes = tuple(i for i in range(kernel.ndim) if i != channel_axis % kernel.ndim)
        peak = np.max(np.abs(kernel), axis=axes, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    return np.clip(np.round(kernel / scale), -127, 127) * scale


def output_shift(layer, input_mean: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """Mean change of ``layer``'s output per channel when its kernel is rounded to int8."""
    import keras

    kernel = layer.get_weights()[0]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        height, width, channels, multiplier = kernel.shape
        flat = kernel.reshape(height, width, channels * multiplier)
        error = (round_like_tflite(flat, -1 if per_channel else None) - flat).reshape(kernel.shape)
        return (error.sum(axis=(0, 1)) * input_mean[:, None]).reshape(-1)
    error = round_like_tflite(kernel, -1 if per_channel else None) - kernel
    if isinstance(layer, keras.layers.Conv2D):
        return np.einsum("hwio,i->o", error, input_mean)
    return error.T @ input_mean  # Dense: (inputs, units)


def _called_on(layer):
    """The tensor ``layer`` is applied to in its enclosing graph. For a nested model this is
    not ``layer.input`` (its own ``Input``) but the input of its call node."""
    import keras

    if isinstance(layer, keras.Model):
        tensors = layer._inbound_nodes[0].input_tensors
        return tensors[0] if len(tensors) == 1 else list(tensors)
    return layer.input


def _input_means(model, samples: np.ndarray, batch_size: int) -> dict[int, np.ndarray]:
    """Per-channel mean of every weighted layer's input over ``samples``, nested models included."""
    import keras

    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}

    def visit(container, inputs) -> None:
        layers = [layer for layer in container.layers if not isinstance(layer, keras.layers.InputLayer)]
        probe = keras.Model(container.input, [_called_on(layer) for layer in layers])
        for layer, values in zip(layers, probe(inputs, training=False), strict=True):
            if isinstance(layer, keras.Model):
                visit(layer, values)
            elif _is_weighted(layer):
                flat = np.asarray(values).reshape(-1, values.shape[-1])
                sums[id(layer)] = sums.get(id(layer), 0.0) + flat.sum(axis=0, dtype=np.float64)
                counts[id(layer)] = counts.get(id(layer), 0) + flat.shape[0]

    for start in range(0, len(samples), batch_size):
        visit(model, samples[start : start + batch_size].astype(np.float32))
    return {key: (sums[key] / counts[key]).astype(np.float32) for key in sums}


def _following_batchnorm(container, layer):
    import keras

    for candidate in container.layers:
        if isinstance(candidate, keras.layers.BatchNormalization) and candidate.input is layer.output:
            return candidate
    return None


def correct_biases(model, samples: Sequence[np.ndarray], per_channel: bool = True, batch_size: int = 4) -> dict:
    """Apply bias correction to ``model`` in place; returns counts of what was corrected.

    ``samples`` are preprocessed ``H x W x C`` uint8 calibration slices (the model takes raw
    pixels). A bias-free layer with no BatchNormalization after it is left as is."""
    import keras

    means = _input_means(model, np.stack(list(samples)), batch_size)
    corrected = {"bias": 0, "batchnorm": 0, "left": 0}

    def visit(container) -> None:
        for layer in container.layers:
            if isinstance(layer, keras.Model):
                visit(layer)
                continue
            if id(layer) not in means:
                continue
            shift = output_shift(layer, means[id(layer)], per_channel)
            weights = layer.get_weights()
            if layer.use_bias:
                weights[1] = weights[1] - shift
                layer.set_weights(weights)
                corrected["bias"] += 1
                continue
            batchnorm = _following_batchnorm(container, layer)
            if batchnorm is None:
                corrected["left"] += 1
                continue
            values = batchnorm.get_weights()
            names = [w.path.split("/")[-1] for w in batchnorm.weights]
            mean_index = names.index("moving_mean")
            values[mean_index] = values[mean_index] + shift  # BN(y + shift) with mean + shift == BN(y)
            batchnorm.set_weights(values)
            corrected["batchnorm"] += 1

    visit(model)
    log.info("bias correction: %s", corrected)
    return corrected
