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


def sample_figures(heatmaps, val, labels, positive_index, y_val, scores, threshold, out, seed: int,
                     per_group: int = 3) -> dict:
    """Grad-CAM for a sample of val slices: right and wrong, both classes (up to ``per_group``
    each), plus the mean share of heatmap mass on the image border over all of val.
    ``heatmaps(pixels, class_indices)`` is the model's Grad-CAM (an ensemble averages its members')."""
    from train import report

    predicted_positive = scores >= threshold
    predicted_index = np.where(predicted_positive, positive_index, 1 - positive_index)
    all_cams = np.concatenate([
        heatmaps(val.pixels[start : start + 32], predicted_index[start : start + 32])
        for start in range(0, len(val.pixels), 32)
    ])
    shares = border_share(all_cams)
    rng = np.random.default_rng(seed)
    chosen, titles = [], []
    sources = getattr(val, "sources", None)
    groups = np.asarray(sources) if sources is not None else np.zeros(len(scores), dtype=int)
    _, first = np.unique(groups, return_index=True)
    names = [groups[i] for i in sorted(first)]
    per_group = per_group if len(names) == 1 else 2  # every source in one figure
    for source, truth, correct in ((n, t, c) for n in names for t in (1, 0) for c in (True, False)):
        members = np.flatnonzero((groups == source) & (y_val == truth) & ((predicted_positive == (truth == 1)) == correct))
        for index in rng.permutation(members)[:per_group]:
            chosen.append(int(index))
            name = labels[positive_index] if truth else labels[1 - positive_index]
            verdict = "right" if correct else "WRONG"
            titles.append(f"{name}, {verdict}, P={scores[index]:.2f}\n{val.paths[index][-28:]}")
    if chosen:
        report.plot_gradcam(val.pixels[chosen], all_cams[chosen], titles, out / "gradcam.png")
    return {
        "class": "predicted class",
        "shown": [val.paths[i] for i in chosen],
        "border_band": 0.125,
        "mean_border_share": mean_defined(shares),
        "uniform_border_share": uniform_border_share(),
        "mean_border_share_right": mean_defined(shares[predicted_positive == (y_val == 1)]),
    }


def mean_defined(values: np.ndarray) -> float | None:
    """Mean over defined values; None (JSON null) when a heatmap is empty everywhere."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def summary_note(summary: dict) -> str:
    share, uniform = summary["mean_border_share"], summary["uniform_border_share"]
    if share is None:
        return "Every Grad-CAM heatmap is empty (the model's output does not depend on its last feature map)."
    if share > uniform + 0.03:
        verdict = "more than a uniform map would: check the overlays for text, arrows or letterbox edges"
    elif share < uniform - 0.03:
        verdict = "less than a uniform map would, i.e. the heatmaps concentrate on the image centre, where the lungs are"
    else:
        verdict = "about what a uniform map would, i.e. no preference for the centre: check the overlays"
    return (
        f"Heatmaps for the predicted class on a random sample of val slices (right and wrong, both classes). "
        f"Over all of val, {share:.0%} of the heatmap mass lies in the outer 12.5 % frame ({uniform:.0%} for a "
        f"uniform map): {verdict}."
    )
