"""One training run, from an ImageFolder to a complete ``RUN_DIR``.

``RUN_DIR`` is the contract ``python -m convert`` reads: ``model.keras`` (best checkpoint by val
ROC AUC) and ``run.json`` (labels, positive label, threshold, preprocessing spec, provenance,
val metrics, recipe), plus ``history.csv``, ``metrics.json``, ``val_scores.csv``, the plots,
Grad-CAM overlays and ``report.md``. ``run.json`` is written last and removed first, so its
presence means the run is complete.
"""

from __future__ import annotations

import csv
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.core.dataset import combined_fingerprint
from device.core.metrics import choose_threshold_by_source, source_metrics
from device.core.preprocess import PreprocessSpec
from train import report
from train.data import DataError, balanced_dataset, balanced_epoch_size, load_sources, stack_splits, trunk_views
from train.gradcam import gradcam, sample_figures, summary_note
from train.model import InitialWeights, build_model, build_source_heads_model, resolve_weights, set_stage, split_model
from train.recipe import Recipe, refuse_idle_flags

log = logging.getLogger(__name__)

DEFAULT_POSITIVE = "COVID"


@dataclass
class RunConfig:
    """What a run needs besides the recipe."""

    arch: str
    data: list[Path]  # one ImageFolder per source (a single Path is one source)
    weights: str  # imagenet | none | path
    out: Path
    recipe: Recipe
    seed: int = 42
    positive_label: str | None = None
    cache_dir: Path | None = Path(".cache/train")
    threads: int = 2
    deterministic: bool = True
    show_progress: bool = True
    eager: bool = False  # steps run eagerly, no graph traced (--eager: smoke runs on a few slices)
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in ["python", "-m", "train", *sys.argv[1:]]))


def configure_tensorflow(seed: int, threads: int, deterministic: bool) -> None:
    """Seeds and threads before any graph exists (TensorFlow refuses thread changes later)."""
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.debug("TensorFlow already initialised; thread settings unchanged")
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def pick_positive(labels: list[str], requested: str | None) -> str:
    if requested is not None:
        if requested not in labels:
            raise DataError(f"--positive-label {requested!r} is not one of the labels {labels}")
        return requested
    if DEFAULT_POSITIVE in labels:
        return DEFAULT_POSITIVE
    raise DataError(f"no {DEFAULT_POSITIVE!r} folder; say which of {labels} is positive with --positive-label")


def _compile(model, learning_rate, recipe: Recipe, ema: bool = False, eager: bool = False) -> None:
    """``eager``: no graph is traced for fit, evaluate and predict. Tracing a backbone's train
    step takes seconds per stage, so a run of a few steps (a smoke run, the test suite's tiny
    runs) spends most of its time there; every real run keeps graphs."""
    import keras

    averaging = {"use_ema": True, "ema_momentum": recipe.ema_momentum} if ema and recipe.ema_momentum > 0 else {}
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=recipe.weight_decay, **averaging),
        # --head sources: the targets carry their own smoothing (train.data.balanced_dataset),
        # and the empty rows of other sources' heads must add nothing to the loss.
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.0 if recipe.head == "sources" else recipe.label_smoothing),
        metrics=[] if recipe.head == "sources" else ["accuracy"],
        run_eagerly=eager,
    )


def train_run(config: RunConfig) -> dict:
    """Train, select, evaluate and write ``config.out``; returns the ``run.json`` content."""
    started = time.perf_counter()
    recipe = config.recipe
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / "run.json"
    if stale.exists():
        log.warning("%s exists from an earlier run; removed so nobody converts a half-written run", stale)
        stale.unlink()

    roots = [Path(config.data)] if isinstance(config.data, (str, Path)) else [Path(d) for d in config.data]
    weights, weights_path = resolve_weights(config.weights)
    spec = PreprocessSpec(height=recipe.img_size, width=recipe.img_size, channels=1)
    labels, sources = load_sources(roots, spec, config.cache_dir, config.show_progress)
    positive = pick_positive(labels, config.positive_label)
    positive_index = labels.index(positive)
    val_pixels, val_targets, val_sources = stack_splits(sources, "val")
    val_paths = [f"{source.name}/{path}" for source in sources for path in source.val.paths]
    y_val = (val_targets == positive_index).astype(np.int64)
    for source in sources:
        source_y = source.val.targets == positive_index
        if source_y.min() == source_y.max():
            raise DataError(f"{source.name}/val needs slices of both labels to select a model and a threshold")

    try:
        refuse_idle_flags(recipe, [source.name for source in sources])
    except ValueError as error:
        raise DataError(str(error)) from None
    configure_tensorflow(config.seed, config.threads, config.deterministic)
    import keras

    from train.callbacks import SnapWeights, ValAUCCheckpoint

    if recipe.head == "experts":
        return _finish(config, recipe, started, out, sources, labels, positive, positive_index, weights, spec, y_val,
                       val_pixels, val_sources, val_paths, val_targets,
                       [], _experts_selection(config, recipe, sources, labels, positive_index, weights, weights_path,
                                              val_pixels, y_val, val_sources, out / "model.keras"))
    heads = None  # --head sources: each val slice's own head
    if recipe.head == "sources":
        names = [source.name for source in sources]
        heads = np.array([names.index(name) for name in val_sources])
        trained, model = build_source_heads_model(config.arch, recipe.img_size, labels, len(sources), weights, weights_path,
                                                  recipe.dropout, recipe.batchnorm_training)
    else:
        model = build_model(config.arch, recipe.img_size, labels, weights, weights_path, recipe.dropout, recipe.batchnorm_training)
        trained = model
    if recipe.snap_weights:
        if recipe.ema_momentum > 0 or recipe.batchnorm_training:
            raise DataError("--snap-weights needs BatchNorm in inference mode and no --ema (it rounds the weights the model runs)")
        from train.snap import snap_model

        # Before the trunk is cached: a frozen trunk then stays on the grid (MobileNetV2's
        # shared ImageNet weights already are: they were dequantized from an int8 model).
        print(f"rounded {snap_model(model)['layers']} convolutions onto the int8 grid (--snap-weights)", flush=True)
    # Every batch holds each (source, label) cell equally often, so the loss needs no class
    # weights: the sampler already balances labels, and sources too.
    epoch_size = balanced_epoch_size(sources, len(labels), recipe.batch_size)
    fitted_model, val_inputs, features = trained, val_pixels, None
    if recipe.trunk_views > 0:
        if recipe.batchnorm_training or recipe.unfreeze_from == "all":
            raise DataError("--trunk-views needs a frozen trunk: a pretrained start and --unfreeze-from a layer")
        trunk, fitted_model = split_model(trained, recipe.unfreeze_from)
        print(f"caching the frozen trunk (up to {recipe.unfreeze_from}) for {recipe.trunk_views} views of each train slice", flush=True)
        features = {}
        for source in sources:
            cached = trunk_views(trunk, source.train.pixels, recipe, config.seed, recipe.trunk_views, config.show_progress)
            features[source.name] = (cached, np.tile(source.train.targets, recipe.trunk_views))
        val_inputs = trunk_views(trunk, val_pixels, recipe, config.seed, 1, config.show_progress)
    dataset = balanced_dataset(sources, len(labels), recipe, config.seed, epoch_size, features,
                               source_rows=recipe.head == "sources")
    checkpoint = out / "model.keras"
    # The budget keeps a margin for loading the checkpoint, Grad-CAM, plots and the report.
    deadline = None
    if recipe.max_minutes:
        deadline = time.monotonic() - (time.perf_counter() - started) + recipe.max_minutes * 60 * 0.95 - 60
    selector = ValAUCCheckpoint(val_inputs, y_val, positive_index, checkpoint, deadline, val_sources, saved_model=model,
                                heads=heads)
    verbose = 1 if sys.stdout.isatty() else 2
    history: list[dict] = []
    steps = epoch_size // recipe.batch_size

    stages = [("head", recipe.head_epochs, recipe.head_learning_rate), ("fine", recipe.fine_epochs, recipe.fine_learning_rate)]
    for stage, epochs, learning_rate in stages:
        if epochs <= 0:
            continue
        if stage == "head":
            trainable = set_stage(model, "head")
            rate = learning_rate
        else:
            trainable = set_stage(model, "fine", recipe.unfreeze_from, recipe.batchnorm_training)
            rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epochs * steps)
        # The weight average only in stage 2: in stage 1 the head starts from random weights.
        averaged = stage == "fine" and recipe.ema_momentum > 0
        _compile(fitted_model, rate, recipe, ema=averaged, eager=config.eager)
        log.info("stage %s: %d epochs, learning rate %g, %d trainable backbone layers", stage, epochs, learning_rate, trainable)
        print(f"stage {stage}: up to {epochs} epochs at learning rate {learning_rate:g}, {trainable} backbone layers trainable", flush=True)
        selector.start_stage(stage, len(history), recipe.patience if stage == "fine" else 0, recipe.min_epochs)
        # SwapEMAWeights first: the averaged weights are in the model when the selector scores
        # val and saves the checkpoint at the end of each epoch.
        callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), selector] if averaged else [selector]
        if recipe.snap_weights:
            callbacks.insert(0, SnapWeights(model))
        fitted = fitted_model.fit(
            dataset, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose, shuffle=False
        )  # the tf.data pipeline shuffles, with the run's seed
        for epoch, _ in enumerate(fitted.history["loss"]):
            row = {"epoch": len(history) + 1, "stage": stage}
            row.update({key: float(values[epoch]) for key, values in fitted.history.items()})
            history.append(row)
        print(f"stage {stage}: best val AUC so far {selector.best[0]:.4f} (epoch {selector.best_epoch})", flush=True)
        if selector.out_of_time:
            break
    if selector.best_epoch is None:
        raise DataError("no epoch was trained (head and fine-tune epochs are both 0)")
    selection = Selection(selector.best_epoch, selector.best_stage, selector.out_of_time, _notes(selector, recipe, weights))
    return _finish(config, recipe, started, out, sources, labels, positive, positive_index, weights, spec, y_val,
                   val_pixels, val_sources, val_paths, val_targets, history, selection)


@dataclass
class Selection:
    """How the saved checkpoint was chosen, for metrics.json and the report."""

    best_epoch: int | None
    best_stage: str
    out_of_time: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _experts_selection(config, recipe, sources, labels, positive_index, weights, weights_path, val_pixels, y_val,
                       val_sources, checkpoint: Path) -> Selection:
    """The experts head fitted and saved in one step (:func:`train.experts.fit_head`): no epochs,
    so no history and no training curves."""
    from train.experts import fit_head

    notes, extra = fit_head(config, recipe, sources, labels, positive_index, weights, weights_path, val_pixels, y_val,
                            val_sources, checkpoint)
    return Selection(None, "experts", False, notes, extra)


def _finish(config, recipe, started, out, sources, labels, positive, positive_index, weights, spec, y_val, val_pixels,
            val_sources, val_paths, val_targets, history: list[dict], selection: Selection) -> dict:
    """Score the saved checkpoint on val, write every figure, the report and ``run.json``."""
    import keras
    import tensorflow as tf

    from train.callbacks import predict_positive

    checkpoint = out / "model.keras"
    # Everything below is computed from the saved checkpoint, so what ships is what was measured.
    best = keras.models.load_model(checkpoint)
    val_scores = predict_positive(best, val_pixels, positive_index)
    threshold = choose_threshold_by_source(y_val, val_scores, val_sources, recipe.threshold_rule)
    val_metrics = source_metrics(y_val, val_scores, val_sources, threshold)
    val = ScoredVal(val_paths, [labels[i] for i in val_targets], val_pixels, val_sources,
                    [path for source in sources for path in source.val.paths])

    _write_history(out / "history.csv", history)
    _write_scores(out / "val_scores.csv", val, labels, val_scores)
    if history:
        report.plot_history(history, out / "training_curves.png")
    report.plot_roc(y_val, val_scores, val_metrics, out / "roc.png", val_sources)
    negative = labels[1 - positive_index]
    report.plot_confusion(val_metrics, positive, negative, out / "confusion_matrix.png")
    report.plot_reliability(y_val, val_scores, val_metrics["ece"], positive, out / "reliability.png", val_sources)
    cam_summary = sample_figures(lambda pixels, classes: gradcam(best, pixels, classes), val, labels, positive_index, y_val, val_scores, threshold, out, config.seed)

    metrics = {
        "val": val_metrics,
        "threshold_rule": recipe.threshold_rule,
        "best_epoch": selection.best_epoch,
        "best_stage": selection.best_stage,
        "epochs_trained": len(history),
        "stopped_by_time_budget": selection.out_of_time,
        "gradcam": cam_summary,
        **selection.extra,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    run = {
        "architecture": config.arch,
        "labels": labels,
        "positive_label": positive,
        "threshold": threshold,
        "threshold_rule": recipe.threshold_rule,
        "preprocessing": spec.to_manifest(),
        "img_size": recipe.img_size,
        "initial_weights": weights.to_dict(),
        "training_data": training_data(sources, labels),
        "metrics": {"val": val_metrics},
        "seed": config.seed,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "recipe": recipe.to_dict(),
        "command": config.command,
    }
    report.write_report(out / "report.md", run, metrics, summary_note(cam_summary), config.command, selection.notes)
    run["wall_seconds"] = round(time.perf_counter() - started, 1)
    partial = out / "run.json.part"
    partial.write_text(json.dumps(run, indent=2))
    partial.replace(out / "run.json")  # last, and atomic: its presence means the run is complete
    return run


@dataclass
class ScoredVal:
    """Val of every source, stacked: what the scores CSV and Grad-CAM samples read."""

    paths: list[str]  # "<source>/<path in its val split>"
    labels: list[str]
    pixels: np.ndarray
    sources: np.ndarray
    relative: list[str]  # the path inside its source's val split


def load_val(roots: list[Path], labels: list[str], spec: PreprocessSpec, cache_dir: Path | None,
             show_progress: bool = True) -> tuple[ScoredVal, np.ndarray, str]:
    """Val of every source folder stacked (as the run scored it), its label indices, and the
    combined val fingerprint :func:`training_data` records (to check it is the same val)."""
    from train.data import load_split

    splits = [(Path(root).resolve().name, load_split(Path(root) / "val", labels, spec, cache_dir, show_progress))
              for root in roots]
    val = ScoredVal(
        [f"{name}/{path}" for name, split in splits for path in split.paths],
        [label for _, split in splits for label in split.labels],
        np.concatenate([split.pixels for _, split in splits]),
        np.concatenate([np.full(len(split.paths), name) for name, split in splits]),
        [path for _, split in splits for path in split.paths],
    )
    targets = np.concatenate([split.targets for _, split in splits])
    return val, targets, combined_fingerprint([(name, split.fingerprint) for name, split in splits])


def training_data(sources, labels: list[str]) -> dict:
    """``run.json``'s data record: each source's name, fingerprints and counts, and combined
    fingerprints (a hash of the sources' in order) under the keys single-source runs used."""
    def combined(key: str) -> str:
        return combined_fingerprint([(s.name, getattr(s, key).fingerprint) for s in sources])

    def total(split: str) -> dict:
        return {label: sum(getattr(s, split).counts(labels)[label] for s in sources) for label in labels}

    return {
        "name": "+".join(source.name for source in sources),
        "fingerprint": combined("train"),
        "val_fingerprint": combined("val"),
        "counts": {"train": total("train"), "val": total("val")},
        "skipped": {"train": sum(len(s.train.skipped) for s in sources), "val": sum(len(s.val.skipped) for s in sources)},
        "sampler": "round-robin over (source, label) cells",
        "sources": [
            {"name": s.name, "fingerprint": s.train.fingerprint, "val_fingerprint": s.val.fingerprint,
             "counts": {"train": s.train.counts(labels), "val": s.val.counts(labels)},
             "skipped": {"train": len(s.train.skipped), "val": len(s.val.skipped)}}
            for s in sources
        ],
    }


def _notes(selector, recipe: Recipe, weights: InitialWeights) -> list[str]:
    notes = []
    if selector.out_of_time:
        notes += [f"Training stopped at the {recipe.max_minutes:g}-minute time budget, not by early stopping: "
                  "another machine may stop at another epoch.", ""]
    if not weights.pretrained:
        notes += ["The backbone was **trained from scratch** (no pretrained weights); this is not a fine-tuned model.", ""]
    if recipe.head == "sources":
        notes += [f"**One head per source** (`--head sources`): the checkpoint was chosen on each source's val scored by "
                  f"its own head (worst source {selector.best[0]:.3f}, the training curves' val AUC); the figures above are "
                  "the saved model's, "
                  "which averages the heads because a new slice's source is unknown. The run is meant as a fine-tuned "
                  "backbone for an experts head (`--weights` this run `--head experts`).", ""]
    return notes


def _write_history(path: Path, rows: list[dict]) -> None:
    keys = ["epoch", "stage"] + sorted({key for row in rows for key in row} - {"epoch", "stage"})
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _write_scores(path: Path, split: ScoredVal, labels: list[str], scores: np.ndarray) -> None:
    """``val_scores.csv``: path inside the source's val split, source, label, P(positive)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "label", "positive_probability"])
        for relative, source, label, score in zip(split.relative, split.sources, split.labels, scores, strict=True):
            writer.writerow([relative, source, label, repr(float(score))])
