"""A mixture of per-source experts on frozen backbone features pooled at several depths.

Why: the two CT sources disagree on every cue but the disease. A linear probe trained on
one source scores the other below chance (window, crop and export run opposite), and a
network fine-tuned on both trades one source for the other from epoch to epoch (MobileNetV2
reaches val AUC 0.94 on the scanner exports after one epoch, then gives it back for the paper
figures). So instead of one boundary for both, a **gate** (which source does this slice look
like?) weights one **linear expert per source**:

    P(COVID | x) = sum_s  P(source s | x) * P(COVID | x, expert s)

The features are the frozen ImageNet backbone's activations averaged over the slice at
several depths (texture from the early stages, lesions' shape from the late ones), each
standardised. Everything is fitted by logistic regression (convex, deterministic, seconds on
two cores) on the cached features of a few views of each train slice, then written into
built-in Keras layers, so the result is an ordinary ``model.keras`` that converts to int8 like
any run. Each expert's regularisation and views (the slice alone, or with augmented copies)
are chosen on its own source's val AUC (the expert alone), like every other choice of a run (val chooses,
so val figures are optimistic; held-back slices judge).
"""

from __future__ import annotations

import numpy as np

# Pooled at the end of each stage: ResNet50's stages 2-4 (stage 4 twice: halfway and at the
# cut), MobileNetV2's stride-8, stride-16 and final feature maps.
DEFAULT_LAYERS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block3_out", "conv4_block6_out"),
    "mobilenetv2": ("block_6_expand_relu", "block_13_expand_relu", "block_16_project_BN", "out_relu"),
}
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
GATE_C = 1.0
HEAD_NAME = "experts"


def feature_layers(arch: str, requested: str) -> tuple[str, ...]:
    return tuple(name for name in requested.split(",") if name) if requested else DEFAULT_LAYERS[arch]


def _backbone_maps(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...]):
    """``(pixels input, feature maps)``: the frozen backbone cut to the named layers' maps
    (deepest last), as one sub-model named like every backbone so Grad-CAM finds it."""
    import keras

    from train.model import build_backbone, scaled_input

    base = build_backbone(arch, img_size, weights, weights_path)
    names = [layer.name for layer in base.layers]
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"{missing} are not layers of the {arch} backbone")
    maps = keras.Model(base.input, [base.get_layer(name).output for name in layers], name=base.name)
    maps.trainable = False
    pixels, x = scaled_input(arch, img_size)
    return pixels, maps(x, training=False)


def build_extractor(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...]):
    """Raw pixels to the pooled maps, joined and not yet standardised: what is cached per view."""
    import keras

    pixels, maps = _backbone_maps(arch, img_size, weights, weights_path, layers)
    pooled = [keras.layers.GlobalAveragePooling2D()(x) for x in maps]
    return keras.Model(pixels, keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0], name="extractor")


def build_experts_model(arch: str, img_size: int, labels: list[str], positive_index: int, weights, weights_path,
                        layers: tuple[str, ...], fitted: dict):
    """The classifier: pixels, backbone maps, then the fitted head (pool and standardise each
    map, gate, experts, mixture, label probabilities), built-in layers only."""
    import keras

    if len(labels) != 2:
        raise ValueError("the experts head is binary (a positive label and one other)")
    pixels, maps = _backbone_maps(arch, img_size, weights, weights_path, layers)
    inputs = [keras.Input(tuple(x.shape[1:]), name=f"map{index}") for index, x in enumerate(maps)]
    scaled, start = [], 0
    for index, x in enumerate(inputs):
        width = int(x.shape[-1])
        pooled = keras.layers.GlobalAveragePooling2D(name=f"pool{index}")(x)
        # Standardised per map before they are joined, so one int8 scale serves every depth.
        scaled.append(keras.layers.Normalization(
            mean=fitted["mean"][start:start + width].tolist(), variance=fitted["variance"][start:start + width].tolist(),
            name=f"standardise{index}")(pooled))
        start += width
    joined = keras.layers.Concatenate(name="features")(scaled) if len(scaled) > 1 else scaled[0]
    n_sources = len(fitted["sources"])
    gate = keras.layers.Dense(n_sources, activation="softmax", name="gate")
    experts = keras.layers.Dense(n_sources, activation="sigmoid", name="source_experts")
    positive = keras.layers.Dot(axes=1, name="mixture")([gate(joined), experts(joined)])
    negative = keras.layers.Rescaling(-1.0, offset=1.0, name="complement")(positive)
    probabilities = keras.layers.Concatenate(name="probabilities")([positive, negative] if positive_index == 0 else [negative, positive])
    head = keras.Model(inputs, probabilities, name=HEAD_NAME)
    gate.set_weights([np.asarray(w, dtype=np.float32) for w in fitted["gate"]])
    experts.set_weights([np.asarray(w, dtype=np.float32) for w in fitted["experts"]])
    return keras.Model(pixels, head(maps), name=f"ctpi_{arch}_experts")


def sample_weights(groups: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Every (group, label) cell weighs the same in total: the balance the batch sampler
    gives the fine-tuned runs, here as loss weights."""
    weights = np.zeros(len(y), dtype=np.float64)
    cells = [(group, label) for group in np.unique(groups) for label in np.unique(y)]
    for group, label in cells:
        members = (groups == group) & (y == label)
        if members.any():
            weights[members] = 1.0 / members.sum()
    return weights * len(y) / weights.sum()


def fit_mixture(train_views: list[np.ndarray], y_train: np.ndarray, s_train: np.ndarray, val: np.ndarray,
                y_val: np.ndarray, s_val: np.ndarray, sources: list[str], c_grid=C_GRID) -> dict:
    """Fit the standardisation, the gate and one expert per source; pick each expert's C and
    views on its own source's val AUC. ``train_views[v]`` is view ``v`` of every train slice
    (view 0 as it is), rows aligned with ``y_train`` / ``s_train``; ``y`` is 1 for positive."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    every = np.concatenate(train_views)
    mean, std = every.mean(axis=0), every.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    views = [(view - mean) / std for view in train_views]
    val_z = (val - mean) / std
    source_index = np.array([sources.index(s) for s in s_train])
    gate = LogisticRegression(C=GATE_C, max_iter=5000, class_weight="balanced").fit(views[0], source_index)
    gate_weight = np.zeros((every.shape[1], len(sources)))
    gate_bias = np.zeros(len(sources))
    if len(sources) == 1:
        gate_bias[0] = 0.0
    else:
        coef, intercept = gate.coef_, gate.intercept_
        if len(sources) == 2:  # sklearn's binary model: one logit for class 1; softmax of (0, z) is the same
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        gate_weight[:, gate.classes_] = coef.T
        gate_bias[gate.classes_] = intercept
    gate_val = _softmax(val_z @ gate_weight + gate_bias)
    expert_weight = np.zeros((every.shape[1], len(sources)))
    expert_bias = np.zeros(len(sources))
    choices = {}
    for index, source in enumerate(sources):
        rows = s_train == source
        best = None
        for n_views in sorted({1, len(views)}):
            x = np.concatenate([view[rows] for view in views[:n_views]])
            y = np.tile(y_train[rows], n_views)
            for c in c_grid:
                expert = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=sample_weights(np.zeros(len(y)), y))
                own = s_val == source
                scores = val_z[own] @ expert.coef_[0] + expert.intercept_[0]
                auc = float(roc_auc_score(y_val[own], scores)) if own.any() and 0 < y_val[own].mean() < 1 else 0.0
                if best is None or auc > best[0] + 1e-9:
                    best = (auc, c, n_views, expert.coef_[0].copy(), float(expert.intercept_[0]))
        auc, c, n_views, coef, intercept = best
        expert_weight[:, index], expert_bias[index] = coef, intercept
        choices[source] = {"C": c, "views": n_views, "val_auc": round(auc, 4)}
    gate_accuracy = float((gate_val.argmax(axis=1) == np.array([sources.index(s) for s in s_val])).mean())
    return {"mean": mean, "variance": std**2, "gate": (gate_weight, gate_bias), "experts": (expert_weight, expert_bias),
            "choices": choices, "gate_val_accuracy": round(gate_accuracy, 4), "sources": list(sources)}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_mixture(fitted: dict, features: np.ndarray) -> np.ndarray:
    """P(positive) of joined, unstandardised pooled features, in numpy: what the Keras head
    computes, for checking it and for scoring cached features."""
    z = (features - fitted["mean"]) / np.sqrt(fitted["variance"])
    gate = _softmax(z @ fitted["gate"][0] + fitted["gate"][1])
    experts = 1.0 / (1.0 + np.exp(-(z @ fitted["experts"][0] + fitted["experts"][1])))
    return (gate * experts).sum(axis=1)
