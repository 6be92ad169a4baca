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
are chosen on its own source's val AUC (the expert alone), the gate's on the mixture's
worst-source val AUC, like every other choice of a run (val chooses, so val figures are
optimistic; held-back slices judge).

Measured on the two shared sources (docs/models.md): the gate is the weak part. Each expert
alone ranks its own source's val better than the mixture does, because the gate sends about
one COVID-CT val slice in eight to the São Paulo expert.

int8: the frozen ImageNet backbone's pooled features move by a fifth to two fifths of their
spread under 8-bit activations, enough to flip decisions near the threshold. A backbone
fine-tuned on CT (``--weights RUN``) moves by a tenth; ``--int8-view`` then fits on the int8
model's own features too and keeps only choices whose val decisions survive them
(:data:`INT8_AGREEMENT`). That is how the shipped MobileNetV2 passes the int8 gate.
"""

from __future__ import annotations

import numpy as np

# Pooled at the end of each stage: ResNet50's stages 2-4 (stage 4 twice: halfway and at the
# cut), MobileNetV2's stride-8, stride-16 and final feature maps.
DEFAULT_LAYERS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block3_out", "conv4_block6_out"),
    "mobilenetv2": ("block_6_expand_relu", "block_13_expand_relu", "block_16_project_BN", "out_relu"),
}
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
GATE_GRID = (0.0001, 0.001, 0.01, 0.1, 1.0)
# With the int8 features of val at hand, a choice (an expert's or the gate's C and views) must
# keep this share of val decisions when its features are the int8 model's: the conversion's
# gate asks 98 %, and what is fitted here is one step short of the converted model.
INT8_AGREEMENT = 0.985
HEAD_NAME = "experts"


def feature_layers(arch: str, requested: str) -> tuple[str, ...]:
    return tuple(name for name in requested.split(",") if name) if requested else DEFAULT_LAYERS[arch]


def _backbone_maps(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...], snap: bool = False):
    """``(pixels input, feature maps)``: the frozen backbone cut to the named layers' maps
    (deepest last), as one sub-model named like every backbone so Grad-CAM finds it. With
    ``snap`` its convolutions are first rounded onto TFLite's int8 grid (:mod:`train.snap`), so
    the head is fitted on the features the int8 model's exact weights compute (ImageNet
    ResNet50's float weights are not on that grid). That takes weight rounding out of the int8
    gap; on the frozen ImageNet ResNet50 the 8-bit activations remain the larger part of it
    (docs/models.md)."""
    import keras

    from train.model import build_backbone, scaled_input

    base = build_backbone(arch, img_size, weights, weights_path)
    if snap:
        from train.snap import snap_model

        snap_model(base)
    names = [layer.name for layer in base.layers]
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"{missing} are not layers of the {arch} backbone")
    maps = keras.Model(base.input, [base.get_layer(name).output for name in layers], name=base.name)
    maps.trainable = False
    pixels, x = scaled_input(arch, img_size)
    return pixels, maps(x, training=False)


def build_extractor(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...], snap: bool = False):
    """Raw pixels to the pooled maps, joined and not yet standardised: what is cached per view."""
    import keras

    pixels, maps = _backbone_maps(arch, img_size, weights, weights_path, layers, snap)
    pooled = [keras.layers.GlobalAveragePooling2D()(x) for x in maps]
    return keras.Model(pixels, keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0], name="extractor")


def int8_features(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...], train_views: list[np.ndarray],
                  pixel_sets: list[np.ndarray], seed: int, samples: int = 300, snap: bool = False) -> list[np.ndarray]:
    """Pooled features of ``pixels`` as the shipped full-int8 model computes them, unstandardised
    to the float features' scale: the extractor up to the head's input (each map pooled and
    standardised, then joined: the tensor the head's int8 layers read) is converted to int8,
    calibrated on ``samples`` train slices as ``python -m convert`` does, and run by the Pi's
    TFLite runtime, on each of ``pixel_sets`` (the first is train, which calibration draws
    from). Row ``i`` is slice ``i`` as it is (no augmentation)."""
    import keras

    from convert.diagnose import tflite_probabilities
    from convert.tflite import to_tflite

    every = np.concatenate(train_views)
    mean, variance = every.mean(axis=0), np.maximum(every.var(axis=0), 1e-12)
    pixels_in, maps = _backbone_maps(arch, img_size, weights, weights_path, layers, snap)
    scaled, start = [], 0
    for x in maps:
        width = int(x.shape[-1])
        pooled = keras.layers.GlobalAveragePooling2D()(x)
        scaled.append(keras.layers.Normalization(mean=mean[start:start + width].tolist(),
                                                 variance=variance[start:start + width].tolist())(pooled))
        start += width
    joined = keras.layers.Concatenate()(scaled) if len(scaled) > 1 else scaled[0]
    extractor = keras.Model(pixels_in, joined, name="standardised_extractor")
    rng = np.random.default_rng(seed)
    train = pixel_sets[0]
    representative = train[rng.choice(len(train), min(samples, len(train)), replace=False)]
    content = to_tflite(extractor, "int8", list(representative))
    return [tflite_probabilities(content, pixels).astype(np.float64) * np.sqrt(variance) + mean for pixels in pixel_sets]


def build_experts_model(arch: str, img_size: int, labels: list[str], positive_index: int, weights, weights_path,
                        layers: tuple[str, ...], fitted: dict, snap: bool = False):
    """The classifier: pixels, backbone maps, then the fitted head (pool and standardise each
    map, gate, experts, mixture, label probabilities), built-in layers only."""
    import keras

    if len(labels) != 2:
        raise ValueError("the experts head is binary (a positive label and one other)")
    pixels, maps = _backbone_maps(arch, img_size, weights, weights_path, layers, snap)
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
                y_val: np.ndarray, s_val: np.ndarray, sources: list[str], c_grid=C_GRID, gate_grid=GATE_GRID,
                val_int8: np.ndarray | None = None, joint: bool = False) -> dict:
    """Fit the standardisation, one expert per source and the gate. Each expert's C and views
    are picked on its own source's val AUC; then the gate's C and views on the mixture's
    worst-source val AUC (the run's selection rule). ``train_views[v]`` is view ``v`` of every
    train slice (view 0 as it is), rows aligned with ``y_train`` / ``s_train``; ``y`` is 1
    for positive. ``val_int8``: val's features as the int8 model computes them; then only
    choices whose decisions survive them (:data:`INT8_AGREEMENT`) compete on AUC, and when none
    does, the one that keeps most decisions wins: a float model the int8 gate refuses ships
    nothing.

    ``joint``: the experts and the gate are chosen **together** instead: every combination of
    candidates competes on the mixture's worst-source val AUC (and, with ``val_int8``, on
    whether the mixture keeps INT8_AGREEMENT of val decisions). Why: what the conversion's gate
    judges is the mixture, and a part's own agreement says little of it (a sharp expert's flips
    matter only on slices the gate sends it, a sharp gate's only where the experts disagree);
    part by part, each on its own agreement, the shipped MobileNetV2 settled on the smoothest
    gate. It searches ~2,000 combinations where part by part tries 24 candidates, so its val
    figures are the more optimistic."""
    from sklearn.linear_model import LogisticRegression

    every = np.concatenate(train_views)
    mean, std = every.mean(axis=0), every.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    views = [(view - mean) / std for view in train_views]
    val_z = (val - mean) / std
    int8_z = None if val_int8 is None else (val_int8 - mean) / std
    view_counts = sorted({1, len(views)})
    candidates = {}  # source -> [(C, views, coef, intercept, own val AUC, own int8 agreement)], simplest first
    for source in sources:
        rows, own = s_train == source, s_val == source
        candidates[source] = []
        for n_views in view_counts:
            x = np.concatenate([view[rows] for view in views[:n_views]])
            y = np.tile(y_train[rows], n_views)
            for c in c_grid:
                expert = LogisticRegression(C=c, max_iter=5000).fit(x, y, sample_weight=sample_weights(np.zeros(len(y)), y))
                coef, intercept = expert.coef_[0].copy(), float(expert.intercept_[0])
                auc = _auc(y_val[own], val_z[own] @ coef + intercept)
                agreement = None if int8_z is None else _agreement(
                    y_val[own], s_val[own], _sigmoid(val_z[own] @ coef + intercept), _sigmoid(int8_z[own] @ coef + intercept))
                candidates[source].append((c, n_views, coef, intercept, auc, agreement))
    gates = []  # (C, views, weight, bias), simplest first
    if len(sources) > 1:
        for n_views in view_counts:
            x = np.concatenate(views[:n_views])
            labels = np.tile(np.array([sources.index(name) for name in s_train]), n_views)
            for c in gate_grid:
                gate = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, labels)
                gates.append((c, n_views, *_softmax_weights(gate, every.shape[1], len(sources))))
    if joint:
        picked, gate_index, worst, agreement = _joint_choice(candidates, gates, sources, y_val, s_val, val_z, int8_z)
    else:  # each expert on its own source (ties: the first, simplest), then the gate for them
        picked = [max(range(len(candidates[s])), key=lambda i, s=s: (_rank(candidates[s][i][4], candidates[s][i][5]), -i))
                  for s in sources]
        gate_index, worst, agreement = _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z)
    expert_weight = np.zeros((every.shape[1], len(sources)))
    expert_bias = np.zeros(len(sources))
    choices = {}
    for index, (source, chosen) in enumerate(zip(sources, picked, strict=True)):
        c, n_views, coef, intercept, auc, own_agreement = candidates[source][chosen]
        expert_weight[:, index], expert_bias[index] = coef, intercept
        choices[source] = {"C": c, "views": n_views, "val_auc": round(auc, 4)}
        if own_agreement is not None:
            choices[source]["int8_agreement"] = round(own_agreement, 4)
    gate_weight, gate_bias = np.zeros((every.shape[1], len(sources))), np.zeros(len(sources))
    gate_choice = {"C": None, "views": None, "worst_source_auc": None}
    if gate_index is not None:
        c, n_views, gate_weight, gate_bias = gates[gate_index]
        gate_choice = {"C": c, "views": n_views, "worst_source_auc": round(worst, 4)}
        if agreement is not None:
            gate_choice["int8_agreement"] = round(agreement, 4)
    gate_val = _softmax(val_z @ gate_weight + gate_bias)
    routed = gate_val.argmax(axis=1) == np.array([sources.index(name) for name in s_val])
    accuracy = {name: round(float(routed[s_val == name].mean()), 4) for name in sources if (s_val == name).any()}
    return {"mean": mean, "variance": std**2, "gate": (gate_weight, gate_bias), "experts": (expert_weight, expert_bias),
            "choices": choices, "gate_choice": gate_choice, "gate_val_accuracy": round(float(routed.mean()), 4),
            "gate_val_accuracy_by_source": accuracy, "sources": list(sources)}


def _mixtures(candidates, picked, gates, sources, z):
    """P(positive) of ``z`` (standardised features) for every gate, with the ``picked`` experts."""
    experts = np.stack([_sigmoid(z @ candidates[s][i][2] + candidates[s][i][3]) for s, i in zip(sources, picked, strict=True)], axis=1)
    if not gates:
        return [experts[:, 0]]
    return [(_softmax(z @ weight + bias) * experts).sum(axis=1) for _, _, weight, bias in gates]


def _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z) -> tuple:
    """(gate index, worst-source AUC, int8 agreement or None) of the best gate for the ``picked``
    experts (the first of equals: the simplest). Without gates (one source) the index is None
    and the figures are the lone expert's."""
    floats = _mixtures(candidates, picked, gates, sources, val_z)
    int8s = None if int8_z is None else _mixtures(candidates, picked, gates, sources, int8_z)
    best = None
    for index, mixed in enumerate(floats):
        worst = min(_auc(y_val[s_val == name], mixed[s_val == name]) for name in sources)
        agreement = None if int8s is None else _agreement(y_val, s_val, mixed, int8s[index])
        key = _rank(worst, agreement)
        if best is None or key > best[0]:
            best = (key, index, worst, agreement)
    return (best[1] if gates else None), best[2], best[3]


def _joint_choice(candidates, gates, sources, y_val, s_val, val_z, int8_z) -> tuple:
    """The experts (one candidate index per source) and gate whose mixture ranks first by
    :func:`_rank` of its worst-source val AUC and, with ``int8_z``, its int8 agreement (ties:
    the first met, i.e. the simplest experts, then the simplest gate)."""
    import itertools

    best = None
    for picked in itertools.product(*(range(len(candidates[s])) for s in sources)):
        gate_index, worst, agreement = _best_gate(candidates, picked, gates, sources, y_val, s_val, val_z, int8_z)
        key = _rank(worst, agreement)
        if best is None or key > best[0]:
            best = (key, list(picked), gate_index, worst, agreement)
    return best[1], best[2], best[3], best[4]


def _rank(auc: float, agreement: float | None) -> tuple:
    """Sort key of a candidate: first whether int8 keeps its decisions, then AUC among those
    that do, agreement among those that do not (ties keep the earlier, simpler candidate)."""
    if agreement is None:
        return (True, round(auc, 9))
    passes = agreement >= INT8_AGREEMENT
    return (passes, round(auc if passes else agreement, 9))


def _agreement(y: np.ndarray, sources: np.ndarray, reference: np.ndarray, int8: np.ndarray) -> float:
    """Share of decisions at the run's threshold rule (Youden on the worst source, of the float
    scores) that the int8 scores keep."""
    from device.core.metrics import choose_threshold_by_source

    threshold = choose_threshold_by_source(y, reference, sources, "youden")
    return float(np.mean((reference >= threshold) == (int8 >= threshold)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if len(y) and 0 < np.mean(y) < 1 else 0.0


def _softmax_weights(gate, width: int, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted sklearn classifier over source indices as softmax weights over all sources."""
    coef, intercept = gate.coef_, gate.intercept_
    if coef.shape[0] == 1:  # sklearn's binary model: one logit for class 1; softmax of (0, z) is the same
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((width, n_sources)), np.zeros(n_sources)
    weight[:, gate.classes_] = coef.T
    bias[gate.classes_] = intercept
    return weight, bias


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_mixture(fitted: dict, features: np.ndarray) -> np.ndarray:
    """P(positive) of joined, unstandardised pooled features, in numpy: what the Keras head
    computes, for checking it and for scoring cached features."""
    z = (features - fitted["mean"]) / np.sqrt(fitted["variance"])
    gate = _softmax(z @ fitted["gate"][0] + fitted["gate"][1])
    return (gate * _sigmoid(z @ fitted["experts"][0] + fitted["experts"][1])).sum(axis=1)


def fit_head(config, recipe, sources, labels, positive_index, weights, weights_path, val_pixels, y_val, val_sources,
             checkpoint) -> tuple[list[str], dict]:
    """A run's experts head: cache pooled features of the train views and of val (and their
    int8 version with ``recipe.int8_view``), fit gate and experts, save the model to
    ``checkpoint``. Returns the report's notes and what ``metrics.json`` records of the head."""
    from train.data import trunk_views

    layers = feature_layers(config.arch, recipe.expert_layers)
    snap = bool(recipe.snap_weights)
    extractor = build_extractor(config.arch, recipe.img_size, weights, weights_path, layers, snap)
    views = max(1, recipe.trunk_views)
    print(f"experts head: pooling {', '.join(layers)} for {views} view(s) of each train slice"
          + (" (the backbone's convolutions rounded onto the int8 grid first, --snap-weights)" if snap else ""), flush=True)
    train_views, y_train, s_train = [[] for _ in range(views)], [], []
    for source in sources:
        cached = trunk_views(extractor, source.train.pixels, recipe, config.seed, views, config.show_progress)
        n = len(source.train.targets)
        for view in range(views):
            train_views[view].append(cached[view * n:(view + 1) * n].astype(np.float64))
        y_train.append(source.train.targets == positive_index)
        s_train.append(np.full(n, source.name))
    val_features = trunk_views(extractor, val_pixels, recipe, config.seed, 1, config.show_progress).astype(np.float64)
    train_views = [np.concatenate(parts) for parts in train_views]
    val_int8 = None
    if recipe.int8_view:
        print("experts head: the int8 view (the extractor converted to full-integer int8, run on every train slice)", flush=True)
        train_int8, val_int8 = int8_features(config.arch, recipe.img_size, weights, weights_path, layers, train_views,
                                             [np.concatenate([source.train.pixels for source in sources]), val_pixels],
                                             config.seed, snap=snap)
        train_views.append(train_int8)
    fitted = fit_mixture(train_views, np.concatenate(y_train).astype(int),
                         np.concatenate(s_train), val_features, y_val, np.asarray(val_sources), [s.name for s in sources],
                         val_int8=val_int8, joint=recipe.experts_choice == "joint")
    model = build_experts_model(config.arch, recipe.img_size, labels, positive_index, weights, weights_path, layers, fitted,
                                snap)
    model.save(checkpoint)
    choices = ", ".join(f"{name}: C {c['C']:g}, {c['views']} view(s), expert val AUC {c['val_auc']:.3f}"
                        for name, c in fitted["choices"].items())
    routed = ", ".join(f"{name} {share:.1%}" for name, share in fitted["gate_val_accuracy_by_source"].items())
    gate = fitted["gate_choice"]
    print(f"experts fitted ({choices}); gate C {gate['C']}, {gate['views']} view(s): routes val slices to their own "
          f"source's expert ({routed})", flush=True)
    notes = [f"Head: a source gate and one linear expert per source on the frozen backbone's maps pooled at {', '.join(layers)} "
             "(logistic regression; each expert's C and views chosen on "
             + ("the mixture, below" if recipe.experts_choice == "joint" else "its own source's val AUC")
             + f": {choices}). "
             f"The gate (C {gate['C']}, {gate['views']} view(s), chosen on the mixture's worst-source val AUC) routes val "
             f"slices to their own source's expert: {routed}. A slice the gate sends to the other source's expert gets that "
             "source's rule, which is where the mixture loses to each expert alone."
             + (f" With the int8 view, only choices that keep {INT8_AGREEMENT:.1%} of val decisions under the int8 "
                "model's features competed on AUC (the most agreeing where none did)." if recipe.int8_view else "")
             + (" Experts and gate were chosen together (--experts-choice joint): every combination of their candidates "
                "competed on the mixture's worst-source val AUC"
                + (" among those whose mixture keeps its val decisions under int8" if recipe.int8_view else "")
                + ", so each expert's C is the mixture's best, not its own." if recipe.experts_choice == "joint" else "")
             + (" The frozen backbone's convolutions were rounded onto TFLite's int8 grid (BatchNorm folded) before any "
                "feature was cached (--snap-weights), so the int8 model's weights are exactly the ones the head was fitted "
                "on." if snap else ""), ""]
    extra = {"experts": {"layers": list(layers), "choices": fitted["choices"], "gate": gate,
                         "gate_val_accuracy": fitted["gate_val_accuracy"],
                         "gate_val_accuracy_by_source": fitted["gate_val_accuracy_by_source"],
                         "int8_view": bool(recipe.int8_view), "choice": recipe.experts_choice,
                         "snapped_backbone": snap}}
    return notes, extra
