"""A tiny real Keras model that separates the synthetic classes, with weights set by hand.

It measures high-frequency energy (mean |Laplacian|) and thresholds it: deterministic, no
training, and small enough to convert to every format in seconds. Used to build the test
bundles through the project's own conversion code.
"""

from __future__ import annotations

import numpy as np

from device.core.preprocess import PreprocessSpec, load_slice
from tests.synthetic import LABELS

# The tiny model scores whole synthetic slices (no body crop): its test bundles stand for any
# bundle, and the crop of preprocessing versions 2 and 3 has tests of its own (tests/test_preprocess.py)
# and runs in every bundle made by `python -m train` in the tests.
SPEC = PreprocessSpec(height=32, width=32, channels=1, crop="none")


def build_model(calibration_slices: list[np.ndarray], is_positive: list[bool]):
    """Keras model on raw 0..255 pixels (scaling inside the graph), softmax over LABELS.

    The head is fitted in closed form: the threshold sits midway between the two class
    means of the energy feature, oriented towards the positive class."""
    import keras

    inputs = keras.Input((SPEC.height, SPEC.width, SPEC.channels), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    laplacian = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)
    conv = keras.layers.Conv2D(2, 3, padding="valid", use_bias=False, activation="relu", name="laplacian")
    x = conv(x)
    conv.set_weights([np.stack([laplacian, -laplacian], axis=-1)[:, :, None, :]])
    features = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(2, activation="softmax", name="head")
    outputs = head(features)
    model = keras.Model(inputs, outputs)
    energy = keras.Model(inputs, features)
    values = energy.predict(np.stack(calibration_slices).astype(np.float32), verbose=0).sum(axis=1)
    positive = np.asarray(is_positive, dtype=bool)
    positive_mean, negative_mean = float(values[positive].mean()), float(values[~positive].mean())
    midpoint = (positive_mean + negative_mean) / 2
    gain = 8.0 / max(abs(positive_mean - negative_mean), 1e-3) * np.sign(positive_mean - negative_mean)
    head.set_weights([np.array([[gain, -gain], [gain, -gain]], np.float32) / 2, np.array([-gain * midpoint / 2, gain * midpoint / 2], np.float32)])
    return model


def labelled_pixels(folder) -> tuple[list[np.ndarray], list[bool]]:
    """Preprocessed slices of an ImageFolder and whether each is positive."""
    from device.core.dataset import list_examples

    examples = list_examples(folder, LABELS)
    return [load_slice(e.path, SPEC) for e in examples], [e.label == LABELS[0] for e in examples]
