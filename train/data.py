"""Training data: ImageFolder splits through the device preprocessing, decoded once and cached.

Every slice goes through :func:`device.core.preprocess.load_slice`, the exact function the Pi runs,
so the model trains on what it will see. Decoding ~550 figure crops costs more than an epoch on
two cores, so the uint8 tensors are cached in one ``.npz`` per split, keyed by the split's
content fingerprint and the preprocessing spec: a changed file or spec is a new cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.core.dataset import fingerprint, list_examples, list_labels
from device.core.preprocess import BadSliceError, PreprocessSpec, load_slice

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data folder cannot be used for training (missing split, wrong labels, no slices)."""


@dataclass
class Split:
    """One split as arrays: ``pixels`` N x H x W x C uint8, ``targets`` label indices."""

    name: str
    root: Path
    paths: list[str]  # relative to root, POSIX
    labels: list[str]
    targets: np.ndarray
    pixels: np.ndarray
    fingerprint: str
    skipped: list[tuple[str, str]]

    def counts(self, labels: list[str]) -> dict[str, int]:
        return {label: int(sum(1 for value in self.labels if value == label)) for label in labels}


def split_labels(data: Path) -> list[str]:
    """Labels of an ImageFolder with ``train/`` and ``val/``; both must have the same folders."""
    data = Path(data)
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise DataError(f"{data} has no {split}/ folder (expected {data}/train/<label>/... and {data}/val/<label>/...)")
    try:
        train_labels, val_labels = list_labels(data / "train"), list_labels(data / "val")
    except ValueError as error:
        raise DataError(str(error)) from None
    if train_labels != val_labels:
        raise DataError(f"train labels {train_labels} differ from val labels {val_labels}")
    if len(train_labels) != 2:
        raise DataError(f"training is binary (one positive label); {data}/train has labels {train_labels}")
    return train_labels


def load_split(root: Path, labels: list[str], spec: PreprocessSpec, cache_dir: Path | None, show_progress: bool = True) -> Split:
    """Preprocess every slice of ``root`` (or read them from the cache). Slices that the device
    would refuse are skipped with a warning and listed in ``skipped``."""
    root = Path(root)
    try:
        examples = list_examples(root, labels)
    except ValueError as error:
        raise DataError(str(error)) from None
    data_fingerprint = fingerprint(examples, root)
    key = hashlib.sha256(
        (data_fingerprint + json.dumps(spec.to_manifest(), sort_keys=True)).encode()
    ).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"{root.name}-{key}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as cached:
            log.info("%s: %d slices from cache %s", root, len(cached["paths"]), cache_file)
            skipped = [tuple(pair) for pair in cached["skipped"].tolist()]
            return Split(
                root.name, root, cached["paths"].tolist(), cached["labels"].tolist(),
                cached["targets"], cached["pixels"], data_fingerprint, skipped,
            )
    from tqdm.auto import tqdm

    paths, names, pixels, skipped = [], [], [], []
    for example in tqdm(examples, desc=f"preprocessing {root.name}", unit="slice", disable=not show_progress):
        relative = example.path.relative_to(root).as_posix()
        try:
            pixels.append(load_slice(example.path, spec))
        except BadSliceError as error:
            log.warning("%s: skipped, %s", relative, error)
            skipped.append((relative, str(error)))
            continue
        paths.append(relative)
        names.append(example.label)
    if not pixels:
        raise DataError(f"no slice under {root} could be read")
    targets = np.array([labels.index(label) for label in names], dtype=np.int64)
    array = np.stack(pixels)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(cache_file.name + ".part.npz")
        np.savez(
            partial, paths=np.array(paths), labels=np.array(names), targets=targets, pixels=array,
            skipped=np.array(skipped, dtype=str).reshape(-1, 2),
        )
        partial.replace(cache_file)  # atomic: an interrupted run never leaves a half cache
    return Split(root.name, root, paths, names, targets, array, data_fingerprint, skipped)


@dataclass
class Source:
    """One data source (an ImageFolder named for where its slices come from) with both splits."""

    name: str
    root: Path
    train: Split
    val: Split


def load_sources(roots: list[Path], spec: PreprocessSpec, cache_dir: Path | None, show_progress: bool = True
                 ) -> tuple[list[str], list[Source]]:
    """Labels and the sources of several ImageFolders. All must have the same labels, and their
    folder names (the source names every figure is reported under) must differ."""
    roots = [Path(root) for root in roots]
    if not roots:
        raise DataError("at least one --data folder is needed")
    names = [root.resolve().name for root in roots]
    if len(set(names)) != len(names):
        raise DataError(f"data folders must have different names (each is a source in every report): {names}")
    labels = split_labels(roots[0])
    for root in roots[1:]:
        other = split_labels(root)
        if other != labels:
            raise DataError(f"{root} has labels {other} but {roots[0]} has {labels}: sources must share labels")
    sources = [
        Source(name, root, load_split(root / "train", labels, spec, cache_dir, show_progress),
               load_split(root / "val", labels, spec, cache_dir, show_progress))
        for name, root in zip(names, roots, strict=True)
    ]
    return labels, sources


def stack_splits(sources: list[Source], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels, targets and per-slice source names of one split over all sources, in order."""
    parts = [getattr(source, split) for source in sources]
    pixels = np.concatenate([part.pixels for part in parts])
    targets = np.concatenate([part.targets for part in parts])
    names = np.concatenate([np.full(len(part.targets), source.name) for part, source in zip(parts, sources, strict=True)])
    return pixels, targets, names


def balanced_epoch_size(sources: list[Source], n_labels: int, batch_size: int) -> int:
    """Slices per epoch: about as many as the sources hold, rounded to whole rounds of the
    (source x label) cells and whole batches, so every epoch draws each cell equally often."""
    cells = len(sources) * n_labels
    total = sum(len(source.train.targets) for source in sources)
    unit = int(np.lcm(cells, batch_size))
    return max(unit, int(round(total / unit)) * unit)


def balanced_dataset(sources: list[Source], n_labels: int, recipe, seed: int, epoch_size: int,
                     features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, source_rows: bool = False):
    """Batches drawn round-robin from every (source, label) cell, each cell reshuffled and
    repeated on its own: an epoch of ``epoch_size`` slices holds exactly ``epoch_size / cells``
    of each, so a large source cannot drown a small one nor a common label a rare one (the
    small cells are seen more often than once per epoch, the large ones less). Augmentation
    as in :func:`train_dataset`. Infinite: ``fit`` takes ``epoch_size / batch`` steps an epoch.

    ``features`` (source name -> (inputs, label indices)) replaces each source's train pixels
    with cached trunk features of augmented views (:func:`train.model.split_model`): they
    are batched as they are, without augmentation.

    ``source_rows`` (``--head sources``): each target is a ``(sources, labels)`` matrix whose
    only non-zero row is the slice's own source, holding its label smoothed by
    ``recipe.label_smoothing`` (the loss then smooths nothing: the empty rows must stay empty)."""
    import tensorflow as tf

    cells = []
    for source_index, source in enumerate(sources):
        inputs, targets = features[source.name] if features else (source.train.pixels, source.train.targets)
        for label in range(n_labels):
            members = np.flatnonzero(targets == label)
            if members.size == 0:
                raise DataError(f"source {source.name} has no training slices of label index {label}")
            onehot = np.zeros((members.size, n_labels), dtype=np.float32)
            onehot[:, label] = 1.0
            if source_rows:
                rows = np.zeros((members.size, len(sources), n_labels), dtype=np.float32)
                rows[:, source_index] = onehot * (1.0 - recipe.label_smoothing) + recipe.label_smoothing / n_labels
                onehot = rows
            cell = tf.data.Dataset.from_tensor_slices((inputs[members], onehot))
            cell_seed = seed + 101 * (source_index * n_labels + label + 1)
            cells.append(cell.shuffle(members.size, seed=cell_seed, reshuffle_each_iteration=True).repeat())
    if epoch_size % len(cells):
        raise ValueError(f"epoch size {epoch_size} is not a whole number of rounds over {len(cells)} cells")
    choice = tf.data.Dataset.range(len(cells)).repeat()
    dataset = tf.data.Dataset.choose_from_datasets(cells, choice)
    if features:
        return dataset.batch(recipe.batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)
    return _augmented_batches(dataset, recipe, seed)


def trunk_views(trunk, pixels: np.ndarray, recipe, seed: int, views: int, show_progress: bool = True,
                batch_size: int = 32) -> np.ndarray:
    """Trunk features (float16) of ``views`` versions of every slice: the slice as it is, then
    ``views - 1`` augmented ones (the train augmentation, a new random draw per view), stacked
    view by view: row ``v * N + i`` is view ``v`` of slice ``i``."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=views * len(pixels), desc="caching trunk views", unit="view", disable=not show_progress) as bar:
        for view in range(views):
            augment = augmenter(recipe, seed + 1000 * view, name=f"view{view}") if view and recipe.augment else None
            for start in range(0, len(pixels), batch_size):
                batch = pixels[start : start + batch_size].astype(np.float32)
                if augment is not None:
                    batch = augment(batch, training=True)
                out.append(np.asarray(trunk(batch, training=False), dtype=np.float16))
                bar.update(len(batch))
    return np.concatenate(out)


def augmenter(recipe, seed: int, zoom: tuple[float, float] | None = None, name: str = "augmentation"):
    """Train-only augmentation as Keras preprocessing layers, run inside ``tf.data`` (never in
    the saved model). Geometry fills with black, like the letterbox padding. Horizontal flips
    only: a CT slice mirrored left-right is still a plausible slice, one upside down is not.
    ``zoom`` is a (zoom-in, zoom-out) range as Keras' ``RandomZoom`` reads it (negative zooms
    in); the default is ``recipe.zoom`` either way. ``recipe`` needs ``rotation``, ``shift``,
    ``brightness`` and ``contrast``, and ``zoom`` unless the range is given."""
    import keras

    zoom = zoom if zoom is not None else (-recipe.zoom, recipe.zoom)
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(recipe.rotation / 360.0, seed=seed + 1, **fill),
            keras.layers.RandomZoom(zoom, seed=seed + 2, **fill),
            keras.layers.RandomTranslation(recipe.shift, recipe.shift, seed=seed + 3, **fill),
            keras.layers.RandomBrightness(recipe.brightness, value_range=(0.0, 255.0), seed=seed + 4),
            keras.layers.RandomContrast(recipe.contrast, value_range=(0.0, 255.0), seed=seed + 5),
        ],
        name=name,
    )


def train_dataset(split: Split, n_labels: int, recipe, seed: int):
    """Shuffled, augmented, batched train split: float32 pixels 0..255 and one-hot targets."""
    import tensorflow as tf

    onehot = np.eye(n_labels, dtype=np.float32)[split.targets]
    dataset = tf.data.Dataset.from_tensor_slices((split.pixels, onehot))
    dataset = dataset.shuffle(len(split.targets), seed=seed, reshuffle_each_iteration=True)
    return _augmented_batches(dataset, recipe, seed)


def _augmented_batches(dataset, recipe, seed: int):
    """(uint8 slice, one-hot) examples to augmented float32 batches, the train-only steps."""
    import tensorflow as tf

    if recipe.degrade > 0:
        randomness = tf.data.Dataset.random(seed=seed + 11, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, randomness).map(lambda pair, key: (degrade(pair[0], recipe.degrade, key), pair[1]))
    dataset = dataset.batch(recipe.batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if recipe.augment:
        augment = augmenter(recipe, seed)
        dataset = dataset.map(lambda x, y: (augment(x, training=True), y))
    if recipe.mixup > 0:
        # One random seed pair per batch from a stream that continues across epochs.
        randomness = tf.data.Dataset.random(seed=seed + 7, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, randomness).map(lambda batch, key: mixup(*batch, recipe.mixup, key))
    return dataset.prefetch(2)


def degrade(pixels, probability: float, key):
    """One uint8 slice (H x W x C), JPEG re-encoded and/or resampled with ``probability`` each.

    The quality and scale ranges cover what the figure crops went through: JPEG export from a
    paper (quality 40-95) and upscaling of small crops to the model's side (a crop of 40 % of
    the side, upscaled, is as smooth as a 90 px figure shown at 224)."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(key, tf.int64), 5)
    height, width = pixels.shape[0], pixels.shape[1]

    def jpeg(image):
        return tf.image.stateless_random_jpeg_quality(image, 40, 95, seed=seeds[1])

    def resample(image):
        scale = tf.random.stateless_uniform([], seeds[3], 0.4, 1.0)
        small = tf.cast(tf.math.round(scale * [height, width]), tf.int32)
        smooth = tf.image.resize(tf.image.resize(image, small, antialias=True), [height, width])
        return tf.cast(tf.clip_by_value(tf.math.round(smooth), 0, 255), tf.uint8)

    pixels = tf.cond(tf.random.stateless_uniform([], seeds[0]) < probability, lambda: jpeg(pixels), lambda: pixels)
    return tf.cond(tf.random.stateless_uniform([], seeds[2]) < probability, lambda: resample(pixels), lambda: pixels)


def mixup(pixels, targets, alpha: float, key):
    """Blend every example of a batch with another one of the same batch (a random pairing),
    pixels and one-hot targets alike, with a Beta(alpha, alpha) weight per example.

    The weight is folded to at least 0.5, so each mixed example stays closer to its own image
    (Keras reads the class weight from the dominant target)."""
    import tensorflow as tf

    n = tf.shape(pixels)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(key, tf.int64), 3)
    a = tf.random.stateless_gamma([n], seed=seeds[0], alpha=alpha)
    b = tf.random.stateless_gamma([n], seed=seeds[1], alpha=alpha)
    weight = tf.maximum(a / (a + b), 1.0 - a / (a + b))
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seeds[2])
    x_weight = tf.reshape(weight, [-1, 1, 1, 1])
    mixed = x_weight * pixels + (1.0 - x_weight) * tf.gather(pixels, partner)
    y_weight = tf.reshape(weight, [-1] + [1] * (len(targets.shape) - 1))  # one-hot or (sources, labels) rows
    return mixed, y_weight * targets + (1.0 - y_weight) * tf.gather(targets, partner)


def class_weights(targets: np.ndarray, n_labels: int) -> dict[int, float]:
    """Inverse-frequency weights normalised so a balanced set gets 1.0 for every class."""
    counts = np.bincount(targets, minlength=n_labels).astype(np.float64)
    if (counts == 0).any():
        raise DataError(f"every label needs training slices; counts are {counts.astype(int).tolist()}")
    return {index: float(len(targets) / (n_labels * count)) for index, count in enumerate(counts)}
