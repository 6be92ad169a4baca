"""``python -m train.pretrain``: self-supervised (SimCLR) adaptation of a backbone to CT slices.

Why: ImageNet features fit COVID-CT's figure crops poorly (a head on the frozen ImageNet
MobileNetV2 reaches val AUC 0.63), and with 425 labelled slices fine-tuning memorises them.
The published 0.94 AUC on this dataset (Self-Trans) comes from contrastive pre-training on CT
images between ImageNet and fine-tuning. This is that step, label-free: two random views of a
slice (crop, rotation, contrast, JPEG re-encoding, blur) must map close together and away from
every other slice of the batch (the NT-Xent loss). The backbone learns what varies between CT
slices and, because JPEG and blur are part of the views, to ignore how a figure was encoded.

Only ``DATA/train`` images are read, with their labels ignored, plus any unlabelled folders
given with ``--extra-images`` (e.g. slices exported from public CT collections: more images is
what this step needs); val stays untouched, for selection and reporting by ``python -m train``:
an extra folder that contains val, or an extra image with the content of a val image, is
refused or skipped. BatchNorm stays frozen in inference mode as in
fine-tuning (the shared weights have it folded).

``OUT`` receives ``backbone.weights.h5`` (pass it to ``python -m train --weights``),
``pretrain.json`` (provenance and the description a run's report shows), ``history.csv`` and
``pretrain_curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from device.core.bundle import file_sha256
from device.core.preprocess import PreprocessSpec
from train.data import DataError, augmenter, degrade, load_split, split_labels
from train.model import WeightsError, build_features, resolve_weights, set_stage
from train.recipe import ARCHITECTURES

log = logging.getLogger(__name__)

WEIGHTS_NAME = "backbone.weights.h5"


@dataclass(frozen=True)
class PretrainRecipe:
    """Hyper-parameters of the contrastive stage, recorded in ``pretrain.json``."""

    img_size: int = 224
    epochs: int = 60
    batch_size: int = 64
    """Slices per step; each gives two views, so the loss contrasts 2 x 64 views. Larger
    batches give more negatives but fewer steps on 425 slices."""
    learning_rate: float = 1e-4
    """AdamW peak, cosine-decayed. Low: the point is to adapt ImageNet features, not to replace
    them with what 425 images alone can teach."""
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection: int = 128
    """Width of the projection head's output (the head is dropped afterwards)."""
    crop: float = 0.4
    """Largest zoom-in of a view (a crop down to 60 % of the side)."""
    rotation: float = 15.0
    shift: float = 0.15
    brightness: float = 0.3
    contrast: float = 0.4
    degrade: float = 0.5
    """Probability of a JPEG re-encoding and of a resampling blur per view (see
    :func:`train.data.degrade`)."""


def nt_xent(z1, z2, temperature: float):
    """SimCLR's normalised temperature-scaled cross entropy for ``n`` pairs of embeddings:
    each of the ``2n`` views must pick its partner among the other ``2n - 1``."""
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)
    n = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits -= 1e9 * tf.eye(2 * n)  # a view is not its own partner
    partners = tf.concat([tf.range(n, 2 * n), tf.range(0, n)], axis=0)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(partners, logits)
    hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), partners), tf.float32)
    return tf.reduce_mean(loss), tf.reduce_mean(hits)


def view_dataset(pixels: np.ndarray, recipe: PretrainRecipe, seed: int):
    """Batches of two independently augmented views of the same slices (float 0..255)."""
    import tensorflow as tf

    augment = augmenter(recipe, seed, zoom=(-recipe.crop, 0.1), name="views")
    dataset = tf.data.Dataset.from_tensor_slices(pixels).shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
    keys = tf.data.Dataset.random(seed=seed + 11, rerandomize_each_iteration=True).batch(4)
    dataset = tf.data.Dataset.zip(dataset, keys).map(
        lambda x, key: (degrade(x, recipe.degrade, key[:2]), degrade(x, recipe.degrade, key[2:]))
    )
    dataset = dataset.batch(recipe.batch_size, drop_remainder=True)
    dataset = dataset.map(
        lambda a, b: (augment(tf.cast(a, tf.float32), training=True), augment(tf.cast(b, tf.float32), training=True))
    )
    return dataset.prefetch(2)


def load_extra_images(folders: list[Path], data: Path, spec: PreprocessSpec, show_progress: bool = True):
    """Unlabelled slices from ``folders`` (recursively) through the device preprocessing, as
    ``(pixels, sources)``. Val must stay unseen: a folder overlapping ``DATA/val`` is an error,
    and an image whose bytes equal a val image's is skipped."""
    import hashlib

    from tqdm.auto import tqdm

    from device.core.dataset import Example, fingerprint, is_candidate, list_examples
    from device.core.preprocess import BadSliceError, load_slice

    val_root = (Path(data) / "val").resolve()
    val_hashes = {hashlib.sha256(e.path.read_bytes()).hexdigest() for e in list_examples(val_root)}
    pixels, sources = [], []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"--extra-images {folder} is not a folder")
        resolved = folder.resolve()
        if resolved.is_relative_to(val_root) or val_root.is_relative_to(resolved):
            raise DataError(f"--extra-images {folder} overlaps {val_root}: val must stay unseen until it scores the model")
        files = sorted(path for path in folder.rglob("*") if is_candidate(path))
        used, skipped, in_val = [], 0, 0
        for path in tqdm(files, desc=f"preprocessing {folder.name}", unit="slice", disable=not show_progress):
            content = path.read_bytes()
            if hashlib.sha256(content).hexdigest() in val_hashes:
                in_val += 1
                continue
            try:
                pixels.append(load_slice(path, spec))
            except BadSliceError as error:
                log.warning("%s: skipped, %s", path, error)
                skipped += 1
                continue
            used.append(Example(path, ""))
        if in_val:
            log.warning("%s: %d image(s) identical to val images left out", folder, in_val)
        sources.append({"name": folder.resolve().name, "slices": len(used), "unreadable": skipped, "identical_to_val": in_val,
                        "fingerprint": fingerprint(used, folder) if used else None})
    stacked = np.stack(pixels) if pixels else np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)
    return stacked, sources


def pretrain(arch: str, data: Path, weights_option: str, out: Path, recipe: PretrainRecipe, seed: int = 42,
             cache_dir: Path | None = Path(".cache/train"), threads: int = 2, show_progress: bool = True,
             command: str = "", extra_images: list[Path] | None = None, deterministic: bool = True) -> dict:
    """Run the contrastive stage and write ``out``; returns the ``pretrain.json`` content."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "pretrain.json", out / WEIGHTS_NAME):
        stale.unlink(missing_ok=True)  # written last: their presence means a finished stage
    labels = split_labels(data)
    spec = PreprocessSpec(height=recipe.img_size, width=recipe.img_size, channels=1)
    initial, weights_path = resolve_weights(weights_option)
    train = load_split(Path(data) / "train", labels, spec, cache_dir, show_progress)
    extra, sources = load_extra_images(extra_images or [], data, spec, show_progress)
    images = np.concatenate([train.pixels, extra]) if len(extra) else train.pixels
    if len(images) < 2 * recipe.batch_size:
        raise DataError(f"{len(images)} slices are too few for batches of {recipe.batch_size} pairs")

    from train.run import configure_tensorflow

    configure_tensorflow(seed, threads, deterministic)
    import keras
    import tensorflow as tf
    from tqdm.auto import tqdm

    pixels, features = build_features(arch, recipe.img_size, initial, weights_path, batchnorm_training=not initial.pretrained)
    z = keras.layers.Dense(512, activation="relu", name="projection_hidden")(features)
    z = keras.layers.Dense(recipe.projection, name="projection")(z)
    network = keras.Model(pixels, z, name=f"simclr_{arch}")
    set_stage(network, "fine", "all", batchnorm_training=not initial.pretrained)
    steps = len(images) // recipe.batch_size
    schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, decay_steps=recipe.epochs * steps)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay)
    # its slot variables now, not in the first step: a tf.function that creates variables is
    # traced twice, and a trace of this step costs seconds
    optimizer.build(network.trainable_variables)

    @tf.function
    def step(view_a, view_b):
        with tf.GradientTape() as tape:
            embedded = network(tf.concat([view_a, view_b], axis=0), training=True)
            loss, hits = nt_xent(embedded[: tf.shape(view_a)[0]], embedded[tf.shape(view_a)[0] :], recipe.temperature)
        gradients = tape.gradient(loss, network.trainable_variables)
        optimizer.apply_gradients(zip(gradients, network.trainable_variables, strict=True))
        return loss, hits

    dataset = view_dataset(images, recipe, seed)
    history = []
    print(f"self-supervised pre-training: {recipe.epochs} epochs of {steps} steps, {len(train.pixels)} train slices "
          f"(labels unused) and {len(extra)} extra slices, from {initial.description}", flush=True)
    for epoch in tqdm(range(1, recipe.epochs + 1), desc="pretrain", unit="epoch", disable=not show_progress):
        losses, accuracies = [], []
        for view_a, view_b in dataset:
            loss, hits = step(view_a, view_b)
            losses.append(float(loss))
            accuracies.append(float(hits))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "pair_accuracy": float(np.mean(accuracies))})
        log.info("pretrain epoch %d: loss %.4f, partner found %.3f", epoch, history[-1]["loss"], history[-1]["pair_accuracy"])

    backbone_file = out / WEIGHTS_NAME
    network.get_layer("backbone").save_weights(backbone_file)
    _write_history(out / "history.csv", history)
    _plot(history, out / "pretrain_curves.png")
    wall = time.perf_counter() - started
    digest = file_sha256(backbone_file)
    record = {
        "method": "simclr",
        "architecture": arch,
        "description": (
            f"self-supervised SimCLR pre-training ({recipe.epochs} epochs on the {len(train.pixels)} "
            f"{Path(data).resolve().name} train images"
            + "".join(f" and {source['slices']} images of {source['name']}" for source in sources)
            + f", labels unused) starting from {initial.description}"
        ),
        "backbone_file": WEIGHTS_NAME,
        "backbone_sha256": digest,
        "initial_weights": initial.to_dict(),
        "training_data": {"name": Path(data).resolve().name, "split": "train", "fingerprint": train.fingerprint,
                          "slices": len(train.pixels)},
        "extra_images": sources,
        "recipe": asdict(recipe),
        "seed": seed,
        "deterministic": deterministic,
        "final": history[-1],
        "wall_seconds": wall,
        "command": command,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    return record


def _write_history(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(rows: list[dict], path: Path) -> None:
    from train import report

    plt = report.pyplot()
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_hits) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [row["loss"] for row in rows])
    ax_loss.set_title("NT-Xent loss (train views)")
    ax_hits.plot(epochs, [row["pair_accuracy"] for row in rows], color="C2")
    ax_hits.set_title("views whose nearest neighbour is their partner")
    for ax in (ax_loss, ax_hits):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.pretrain",
        description="Self-supervised (SimCLR) pre-training of a backbone on DATA/train images, labels unused; "
                    "pass OUT/backbone.weights.h5 to python -m train --weights.",
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True)
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder; only train/ is read")
    parser.add_argument("--weights", required=True, help="starting weights: imagenet, none, or a Keras .weights.h5 file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=lambda value: Path(value) if value else None, default=Path(".cache/train"))
    parser.add_argument("--extra-images", type=Path, action="append", default=[],
                        help="a folder of unlabelled CT slices to learn from as well (repeatable; never val)")
    parser.add_argument("--no-determinism", action="store_true", help="skip tf op determinism (faster on some ops)")
    parser.add_argument("-q", "--quiet", action="store_true")
    defaults = PretrainRecipe()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = PretrainRecipe(**{name: getattr(args, name) for name in asdict(defaults)})
    command = " ".join(["python -m train.pretrain", *(argv if argv is not None else sys.argv[1:])])
    try:
        record = pretrain(args.arch, args.data, args.weights, args.out, recipe, args.seed, args.cache, args.threads,
                          not args.quiet, command, args.extra_images, not args.no_determinism)
    except (DataError, WeightsError) as error:
        print(f"train.pretrain: {error}", file=sys.stderr)
        return 2
    final = record["final"]
    print(f"{args.out / WEIGHTS_NAME}: loss {final['loss']:.4f}, partner found {final['pair_accuracy']:.3f}; "
          f"wall time {record['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
