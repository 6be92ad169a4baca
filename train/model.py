"""The classifier graph: raw grey 0..255 pixels in, softmax over the labels out.

Everything the device needs sits inside the graph, in built-in layers only (no Lambda, no
custom classes), so ``keras.models.load_model`` works without ``custom_objects`` and the
converter exports it as is: grey repeated to three channels, the backbone's own input
scaling, the backbone, pooling, dropout, softmax in label order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from device.core.bundle import file_sha256

log = logging.getLogger(__name__)

BACKBONE_NAME = "backbone"
RESNET50_CUT = "conv4_block6_out"

# Weights files whose provenance we know, by sha256: the description a report prints for them.
KNOWN_WEIGHTS = {
    "91b01414a6c056eee72c3da3a01676fcaaad25b60cfc45c77dc19b641ee902cf": (
        "ImageNet ResNet50 weights for conv1 through stage 4 (conv4_block6_out), converted from Kaiming He's "
        "Caffe ResNet-50 (the model Keras' own weights come from; identical numbers for those layers; see the "
        "shared weights README)"
    ),
    "22f873a4f165c75daab229267e8ade97d1e5e2a12c47a25f4a9eaf17b8e8313d": (
        "ImageNet MobileNetV2 1.0/224 weights (no top) dequantized from the google-coral/test_data "
        "int8 model tf2_mobilenet_v2_1.0_224_ptq.tflite, BatchNorm folded (see the shared weights README)"
    ),
}


class WeightsError(ValueError):
    """Initial weights that cannot be used: missing file, wrong architecture, bad option."""


@dataclass(frozen=True)
class InitialWeights:
    """Where the backbone's starting weights came from, as ``run.json`` records it."""

    kind: str  # imagenet | file | run | none
    file: str | None = None
    sha256: str | None = None
    description: str = ""

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "sha256": self.sha256, "description": self.description}


def resolve_weights(option: str) -> tuple[InitialWeights, Path | None]:
    """``imagenet`` | ``none`` | a path to a Keras weights file | a fine-tuned run's
    ``model.keras``, as an :class:`InitialWeights`."""
    if option == "imagenet":
        return InitialWeights("imagenet", description="ImageNet weights from Keras' own download (keras.applications)"), None
    if option == "none":
        return InitialWeights("none", description="none: trained from scratch (random initialisation)"), None
    path = Path(option)
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (use --weights imagenet, none, a Keras .weights.h5 file "
                           "or a run's model.keras)")
    if path.name.endswith(".keras"):
        return _run_weights(path), path
    if not path.name.endswith(".weights.h5"):
        raise WeightsError(f"{path.name}: expected a Keras weights file ending in .weights.h5 (from model.save_weights)")
    digest = file_sha256(path)
    description = KNOWN_WEIGHTS.get(digest) or _pretrained_here(path, digest) or f"Keras weights file {path.name} (sha256 {digest[:12]}...)"
    return InitialWeights("file", path.name, digest, description), path


def _run_weights(path: Path) -> InitialWeights:
    """The backbone of a run this project trained (its ``model.keras``, ``run.json`` beside it):
    what the experts head is fitted on when a fine-tuned backbone's features quantize better
    than ImageNet's (docs/models.md). The description names the run and its val figures."""
    digest = file_sha256(path)
    try:
        run = json.loads((path.parent / "run.json").read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"{path}: a model.keras is accepted as --weights only inside a run folder with its run.json "
                           f"({error})") from error
    val = (run.get("metrics") or {}).get("val") or {}
    figures = ", ".join(f"{name} {figures['auc']:.3f}" for name, figures in sorted((val.get("sources") or {}).items())
                        if isinstance(figures, dict) and figures.get("auc") is not None)
    command = run.get("command") or ""
    description = (f"the backbone of the {run.get('architecture', '?')} run {path.parent.name} fine-tuned by this project"
                   + (f" (val AUC {figures})" if figures else "") + (f": {command}" if command else "")
                   + f"; model.keras sha256 {digest[:12]}...")
    return InitialWeights("run", f"{path.parent.name}/{path.name}", digest, description)


def _pretrained_here(path: Path, digest: str) -> str | None:
    """The description :mod:`train.pretrain` left next to a weights file it wrote, if the file
    is still the one it describes (so a report never credits pre-training to other weights)."""
    record = path.parent / "pretrain.json"
    try:
        pretrain = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if pretrain.get("backbone_sha256") != digest:
        return None
    return pretrain.get("description")


def build_backbone(arch: str, img_size: int, weights: InitialWeights, weights_path: Path | None = None):
    """The ImageNet backbone without its top, with the requested starting weights, named
    ``backbone`` whatever the architecture so stages and Grad-CAM find it."""
    import keras

    shape = (img_size, img_size, 3)
    keras_weights = "imagenet" if weights.kind == "imagenet" else None
    if arch == "mobilenetv2":
        base = keras.applications.MobileNetV2(
            input_shape=shape, alpha=1.0, include_top=False, weights=keras_weights, name=BACKBONE_NAME
        )
    elif arch == "resnet50":
        # Cut after stage 4 ("C4", as Faster R-CNN's ResNet backbone): 1,024 channels at stride 16.
        # The ImageNet weights that can be had offline stop there, stage 5 from random init would
        # have to learn 15M parameters from ~1,900 slices on two cores, and the cut network is
        # lighter on a Pi (8.6M parameters instead of 23.6M). With `imagenet` Keras' complete
        # weights load first and the same cut applies, so both starts give the same graph.
        full = keras.applications.ResNet50(input_shape=shape, include_top=False, weights=keras_weights)
        base = keras.Model(full.input, full.get_layer(RESNET50_CUT).output, name=BACKBONE_NAME)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    if weights.kind == "file":
        load_backbone_weights(base, weights_path)
    elif weights.kind == "run":
        load_run_backbone(base, weights_path)
    return base


def load_run_backbone(base, path: Path) -> None:
    """Copy the ``backbone`` sub-model of a run's ``model.keras`` into ``base`` (same
    architecture and input size, or a :class:`WeightsError` that says which)."""
    import keras

    try:
        source = keras.models.load_model(path, compile=False).get_layer(BACKBONE_NAME)
    except (ValueError, OSError) as error:
        raise WeightsError(f"{path}: not a model with a {BACKBONE_NAME!r} sub-model ({error})") from error
    # The run's backbone may be cut shorter (the experts head keeps only the maps it pools):
    # copy layer by layer by name, and every layer of the new backbone must be found.
    weights = {layer.name: layer.get_weights() for layer in source.layers}
    for layer in base.layers:
        if not layer.weights:
            continue
        if layer.name not in weights or [w.shape for w in weights[layer.name]] != [tuple(w.shape) for w in layer.weights]:
            raise WeightsError(f"{path}: its backbone has no layer {layer.name!r} of the same shape: "
                               "it comes from another architecture or input size")
        layer.set_weights(weights[layer.name])


def load_backbone_weights(base, path: Path) -> None:
    """Load a Keras ``save_weights`` file into a backbone, with an error that names the cause."""
    try:
        base.load_weights(path)
    except (ValueError, KeyError, OSError) as error:
        raise WeightsError(
            f"{Path(path).name} does not fit a {base.name} backbone without top ({error}); "
            "the file must come from save_weights of the same architecture"
        ) from None


def scaled_input(arch: str, img_size: int):
    """``(pixels input, backbone input)``: raw grey 0..255 pixels repeated to three channels and
    scaled the way the backbone's ImageNet weights expect, in built-in layers."""
    import keras

    pixels = keras.Input((img_size, img_size, 1), name="pixels")
    x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb")([pixels, pixels, pixels])
    if arch == "mobilenetv2":
        return pixels, keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_pm1")(x)
    # Keras ResNet50 'caffe' mode: BGR minus ImageNet means; grey input makes BGR == RGB
    return pixels, keras.layers.Normalization(mean=[103.939, 116.779, 123.68], variance=[1.0, 1.0, 1.0], name="imagenet_means")(x)


def build_features(arch: str, img_size: int, weights: InitialWeights, weights_path: Path | None = None,
                   batchnorm_training: bool = False):
    """Raw grey pixels to pooled backbone features, ``(pixels input, features)``: the part
    the classifier and self-supervised pre-training (:mod:`train.pretrain`) share, so the
    backbone sees the same input scaling in both."""
    import keras

    base = build_backbone(arch, img_size, weights, weights_path)
    pixels, x = scaled_input(arch, img_size)
    # Pretrained: BatchNorm stays in inference mode whatever fit() says (the shared weights have
    # BN folded in; batch statistics would throw the learned scales away). From scratch, BN
    # follows the training flag like any normal network.
    if batchnorm_training:
        # From scratch only: Keras' MobileNetV2 BN momentum 0.999 would need ~1000 steps (70
        # epochs of 425 slices) before the inference statistics match the trained network, and
        # until then inference outputs are near-constant; 0.9 settles within a few epochs.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    x = base(x, training=None if batchnorm_training else False)
    return pixels, keras.layers.GlobalAveragePooling2D(name="pool")(x)


def build_model(arch: str, img_size: int, labels: list[str], weights: InitialWeights, weights_path: Path | None = None,
                dropout: float = 0.3, batchnorm_training: bool = False):
    """The full classifier on ``img_size x img_size x 1`` raw pixels (the device spec)."""
    import keras

    pixels, x = build_features(arch, img_size, weights, weights_path, batchnorm_training)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(len(labels), activation="softmax", name="probabilities")(x)
    return keras.Model(pixels, outputs, name=f"ctpi_{arch}")


def build_source_heads_model(arch: str, img_size: int, labels: list[str], n_sources: int, weights: InitialWeights,
                             weights_path: Path | None = None, dropout: float = 0.3, batchnorm_training: bool = False):
    """``(trained, saved)`` for ``--head sources``: one backbone, one softmax head per source.

    ``trained`` maps pixels to ``(n_sources, n_labels)`` probabilities (row ``s``: source
    ``s``'s head), what the loss sees with each slice's target in its own source's row only.
    ``saved`` shares every layer and averages the rows into the ``(n_labels,)`` output every
    run has, so ``model.keras`` loads, converts and is scored like any classifier."""
    import keras

    pixels, x = build_features(arch, img_size, weights, weights_path, batchnorm_training)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(n_sources * len(labels), name="source_logits")(x)
    x = keras.layers.Reshape((n_sources, len(labels)), name="per_source")(x)
    rows = keras.layers.Softmax(axis=-1, name="source_probabilities")(x)
    averaged = keras.layers.GlobalAveragePooling1D(name="probabilities")(rows)
    return keras.Model(pixels, rows, name=f"ctpi_{arch}_heads"), keras.Model(pixels, averaged, name=f"ctpi_{arch}")


def backbone(model):
    return model.get_layer(BACKBONE_NAME)


def set_stage(model, stage: str, unfreeze_from: str = "all", batchnorm_training: bool = False) -> int:
    """Make the layers of a stage trainable: ``head`` freezes the backbone, ``fine`` unfreezes
    it from layer ``unfreeze_from`` on. BatchNorm stays frozen unless ``batchnorm_training``.
    Returns the number of trainable backbone layers."""
    import keras

    base = backbone(model)
    if stage == "head":
        base.trainable = False
        return 0
    base.trainable = True
    names = [layer.name for layer in base.layers]
    if unfreeze_from == "all":
        start = 0
    elif unfreeze_from in names:
        start = names.index(unfreeze_from)
    else:
        raise ValueError(f"--unfreeze-from {unfreeze_from!r} is not a layer of {model.name}'s backbone")
    trainable = 0
    for index, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and (batchnorm_training or not is_bn)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def split_model(model, first_trainable: str):
    """The classifier cut where the trainable part begins, as two models sharing its layers:
    ``trunk`` (raw pixels to the input of backbone layer ``first_trainable``) and ``tail``
    (those features to the class probabilities). Training ``tail`` trains ``model``.

    With the trunk frozen and BatchNorm in inference mode, the trunk is a fixed function, so
    its output can be computed once per augmented view of each slice and cached: an epoch
    then costs only the tail, a fraction of the network (:func:`train.run.train_run`)."""
    import keras

    base = backbone(model)
    names = [layer.name for layer in base.layers]
    if first_trainable not in names:
        raise ValueError(f"{first_trainable!r} is not a layer of {model.name}'s backbone")
    cut = base.get_layer(first_trainable).input
    inner_trunk = keras.Model(base.input, cut, name="trunk_backbone")
    inner_tail = keras.Model(cut, base.output, name="tail_backbone")
    scaled = model.layers[model.layers.index(base) - 1].output  # the scaled RGB input of the backbone
    trunk = keras.Model(model.input, inner_trunk(scaled), name="trunk")
    features = keras.Input(cut.shape[1:], name="trunk_features")
    x = inner_tail(features, training=False)
    for layer in model.layers[model.layers.index(base) + 1:]:
        x = layer(x)
    return trunk, keras.Model(features, x, name="tail")
