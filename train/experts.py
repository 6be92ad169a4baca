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
(:data:`train.mixture.INT8_AGREEMENT`). That is how the shipped MobileNetV2 passes the int8 gate.
"""

from __future__ import annotations

import numpy as np

from train.mixture import INT8_AGREEMENT, fit_mixture, parse_fixed

# Pooled at the end of each stage: ResNet50's stages 2-4 (stage 4 twice: halfway and at the
# cut), MobileNetV2's stride-8, stride-16 and final feature maps.
DEFAULT_LAYERS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block3_out", "conv4_block6_out"),
    "mobilenetv2": ("block_6_expand_relu", "block_13_expand_relu", "block_16_project_BN", "out_relu"),
}
HEAD_NAME = "experts"
# The int8 view's calibration without --int8-view-samples: this many train slices at random (the
# draw both shipped heads were fitted with).
RANDOM_VIEW_SAMPLES = 300


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


def calibration_pixels(sources, labels: list[str], samples: int, seed: int) -> np.ndarray:
    """The train slices ``python -m convert --calibration-samples samples`` calibrates int8 on
    (:func:`convert.calibration.draw_by_source`, same seed), in its order: the int8 view must see
    the activation ranges the shipped model will have, and those depend on the draw."""
    from convert.calibration import draw_by_source
    from device.core.dataset import list_examples

    draws = draw_by_source([list_examples(source.train.root, labels) for source in sources], samples, seed)
    picked = []
    for source, (chosen, _) in zip(sources, draws, strict=True):
        row = {path: index for index, path in enumerate(source.train.paths)}
        relative = (example.path.relative_to(source.train.root).as_posix() for example in chosen)
        picked.append(source.train.pixels[[row[path] for path in relative if path in row]])  # unreadable files: skipped by both
    return np.concatenate(picked)


def int8_features(arch: str, img_size: int, weights, weights_path, layers: tuple[str, ...], train_views: list[np.ndarray],
                  pixel_sets: list[np.ndarray], representative: np.ndarray, snap: bool = False) -> list[np.ndarray]:
    """Pooled features of ``pixels`` as the shipped full-int8 model computes them, unstandardised
    to the float features' scale: the extractor up to the head's input (each map pooled and
    standardised, then joined: the tensor the head's int8 layers read) is converted to int8,
    calibrated on ``representative`` (the run's draw: :func:`calibration_pixels` with
    ``--int8-view-samples N``, else :data:`RANDOM_VIEW_SAMPLES` at random), and run by the Pi's
    TFLite runtime, on each of ``pixel_sets``. Row ``i`` is slice ``i`` as it is
    (no augmentation)."""
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
        every_train = np.concatenate([source.train.pixels for source in sources])
        if recipe.int8_view_samples > 0:
            drawn = f"the {recipe.int8_view_samples} train slices python -m convert --calibration-samples " \
                    f"{recipe.int8_view_samples} draws"
            representative = calibration_pixels(sources, labels, recipe.int8_view_samples, config.seed)
        else:  # the shipped heads' draw
            drawn = f"{RANDOM_VIEW_SAMPLES} train slices at random"
            rng = np.random.default_rng(config.seed)
            representative = every_train[rng.choice(len(every_train), min(RANDOM_VIEW_SAMPLES, len(every_train)), replace=False)]
        print(f"experts head: the int8 view (the extractor converted to full-integer int8, calibrated on {drawn}, "
              "run on every train slice)", flush=True)
        train_int8, val_int8 = int8_features(config.arch, recipe.img_size, weights, weights_path, layers, train_views,
                                             [every_train, val_pixels], representative, snap=snap)
        train_views.append(train_int8)
    fitted = fit_mixture(train_views, np.concatenate(y_train).astype(int),
                         np.concatenate(s_train), val_features, y_val, np.asarray(val_sources), [s.name for s in sources],
                         val_int8=val_int8, joint=recipe.experts_choice == "joint", fixed=parse_fixed(recipe.experts_fixed))
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
             "source's rule, which is where the mixture loses to each expert alone (each expert on each source's val: "
             + "; ".join(f"{expert} expert " + ", ".join(f"{source} {auc:.3f}" for source, auc in row.items())
                         for expert, row in fitted["expert_auc_by_source"].items()) + ")."
             + (f" With the int8 view, only choices that keep {INT8_AGREEMENT:.1%} of val decisions under the int8 "
                "model's features competed on AUC (the most agreeing where none did)." if recipe.int8_view else "")
             + (" Experts and gate were chosen together (--experts-choice joint): every combination of their candidates "
                "competed on the mixture's worst-source val AUC"
                + (" among those whose mixture keeps its val decisions under int8" if recipe.int8_view else "")
                + ", so each expert's C is the mixture's best, not its own." if recipe.experts_choice == "joint" else "")
             + (f" Choices given, not chosen (--experts-fixed {recipe.experts_fixed}): those parts' val figures "
                "were not used to pick them." if recipe.experts_fixed else "")
             + (" The frozen backbone's convolutions were rounded onto TFLite's int8 grid (BatchNorm folded) before any "
                "feature was cached (--snap-weights), so the int8 model's weights are exactly the ones the head was fitted "
                "on." if snap else ""), ""]
    extra = {"experts": {"layers": list(layers), "choices": fitted["choices"], "gate": gate,
                         "gate_val_accuracy": fitted["gate_val_accuracy"],
                         "gate_val_accuracy_by_source": fitted["gate_val_accuracy_by_source"],
                         "expert_auc_by_source": fitted["expert_auc_by_source"],
                         "int8_view": bool(recipe.int8_view), "choice": recipe.experts_choice,
                         **({"fixed": recipe.experts_fixed} if recipe.experts_fixed else {}),
                         **({"int8_view_samples": recipe.int8_view_samples} if recipe.int8_view and recipe.int8_view_samples else {}),
                         "snapped_backbone": snap}}
    return notes, extra
