"""Grad-CAM heatmaps (Selvaraju et al. 2017): where in a slice the backbone's last feature map
drove the predicted class. Used to look for shortcuts (text, arrows, letterbox borders) rather
than lungs, which this data set invites: its images are figures cut out of papers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from train.model import BACKBONE_NAME


def gradcam(model, pixels: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
    """Heatmaps in [0, 1] at input resolution (N x H x W) for each slice's given class.

    The model is replayed layer by layer (it is a plain chain: grey-to-RGB, scaling, backbone,
    pooling, dropout, softmax, or the experts head) so the backbone's output can be watched by
    the gradient tape.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(pixels.astype(np.float32))
    with tf.GradientTape() as tape:
        h = x
        features = None
        for layer in model.layers[1:]:
            if layer.name == "grey_to_rgb":
                h = layer([h, h, h])
            elif layer.name == BACKBONE_NAME:
                h = layer(h, training=False)
                # An experts model's backbone gives several maps (train.experts): the deepest,
                # last, is the one Grad-CAM explains.
                features = h[-1] if isinstance(h, (list, tuple)) else h
                tape.watch(features)
            else:
                h = layer(h, training=False)
        chosen = tf.gather(h, tf.convert_to_tensor(class_indices, dtype=tf.int32), axis=1, batch_dims=1)
    gradients = tape.gradient(chosen, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    height, width = pixels.shape[1:3]
    out = np.zeros((len(cams), height, width), dtype=np.float32)
    for index, cam in enumerate(cams):
        peak = float(cam.max())
        scaled = cam / peak if peak > 0 else cam
        out[index] = np.asarray(Image.fromarray(scaled.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def border_share(cams: np.ndarray, band: float = 0.125) -> np.ndarray:
    """Share of each heatmap's mass in the outer frame of width ``band`` x side. A uniform map
    gives 1 - (1 - 2 band)^2 (0.44 for 0.125); much more means attention on borders, where
    letterbox edges, figure labels and scale bars sit."""
    height, width = cams.shape[1:3]
    dy, dx = max(1, int(round(height * band))), max(1, int(round(width * band)))
    frame = np.ones((height, width), dtype=bool)
    frame[dy : height - dy, dx : width - dx] = False
    totals = cams.sum(axis=(1, 2))
    return np.where(totals > 0, (cams * frame).sum(axis=(1, 2)) / np.maximum(totals, 1e-12), np.nan)


def uniform_border_share(band: float = 0.125) -> float:
    return 1.0 - (1.0 - 2.0 * band) ** 2
