"""A training run whose convolution weights lie on TFLite's int8 grid, for a full-integer int8
that agrees with the model it is gated against.

Why: the fine-tuned MobileNetV2 is fragile to 8-bit rounding of its weights (int8 weights with
float activations alone agreed with Keras on 95 % of val slices; the gate needs 98 %), and
rounding a weight is a deterministic change that calibration data cannot undo. TFLite
quantizes every convolution and depthwise kernel per output channel, symmetrically:
``scale = max |w| / 127``, ``q = round(w / scale)``, after folding the BatchNormalization that
follows it. Rounding the Keras kernels to exactly that grid first (BatchNorm folded in, then
unfolded again) makes the weight half of quantization lossless: the converter recomputes the
same scales and the same integers. What int8 still rounds is the activations.

The rounded network is a (slightly) different model, so it is scored again on val and its
threshold is chosen again by the run's own rule; everything downstream (conversion, its gate,
the model card) then compares every format with *this* model, and the run says what was done
(``snapped`` in ``run.json``, with val figures before and after). The classifier head (Dense)
is left as it is: TFLite may quantize it per tensor, and it is 0.1 % of the weights.

``python -m train.snap --run runs/mobilenetv2 --data DATA_A --data DATA_B --out runs/mobilenetv2-snapped``
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from device.core.metrics import choose_threshold_by_source, source_metrics

LEVELS = 127  # TFLite int8 weights: symmetric, narrow range [-127, 127]
COPIED = ("history.csv", "training_curves.png")  # what the run's training made; the rest is re-scored


class SnapError(ValueError):
    """A run that cannot be snapped (missing files, a layer this module does not know)."""


def snap_kernel(kernel: np.ndarray, fold: np.ndarray | None = None) -> np.ndarray:
    """``kernel`` (output channels on the last axis) rounded to the per-channel int8 grid of
    ``kernel * fold`` (the kernel as the converter sees it, BatchNorm folded in), in
    ``kernel``'s own scale. A channel of zeros stays zeros."""
    kernel = np.asarray(kernel, np.float64)
    fold = np.ones(kernel.shape[-1]) if fold is None else np.asarray(fold, np.float64)
    folded = kernel * fold
    flat = folded.reshape(-1, folded.shape[-1])
    scale = np.abs(flat).max(axis=0) / LEVELS
    safe = np.where(scale > 0, scale, 1.0)
    snapped = np.round(folded / safe) * safe
    snapped = np.where(scale > 0, snapped, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        unfolded = np.where(fold != 0, snapped / np.where(fold != 0, fold, 1.0), kernel)
    return unfolded.astype(np.float32)


def batchnorm_fold(norm) -> np.ndarray | None:
    """Per-channel factor ``gamma / sqrt(variance + epsilon)`` of an inference-mode BatchNormalization."""
    if norm is None:
        return None
    weights = {w.path.split("/")[-1]: np.asarray(w.numpy(), np.float64) for w in norm.weights}
    gamma = weights.get("gamma", np.ones_like(weights["moving_variance"]))
    return gamma / np.sqrt(weights["moving_variance"] + norm.epsilon)


def snap_model(model) -> dict:
    """Round every Conv2D and DepthwiseConv2D kernel of ``model`` in place; the figures of the change."""
    import keras

    from train.rebuild import keras_layers

    layers, moved, largest = 0, [], 0.0
    for layer, norm in keras_layers(model):
        if isinstance(layer, keras.layers.Dense):
            continue
        weights = layer.get_weights()
        kernel = weights[0]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            height, width, channels, multiplier = kernel.shape
            shaped = kernel.reshape(height, width, channels * multiplier)  # TFLite's channel order
            snapped = snap_kernel(shaped, batchnorm_fold(norm)).reshape(kernel.shape)
        elif isinstance(layer, keras.layers.Conv2D):
            snapped = snap_kernel(kernel, batchnorm_fold(norm))
        else:  # pragma: no cover - keras_layers yields only the three kinds
            raise SnapError(f"{layer.name}: cannot snap a {type(layer).__name__}")
        change = np.abs(snapped - kernel)
        moved.append(float(change.mean() / max(np.abs(kernel).mean(), 1e-12)))
        largest = max(largest, float(change.max()))
        layer.set_weights([snapped, *weights[1:]])
        layers += 1
    if not layers:
        raise SnapError(f"{model.name} has no convolution to snap")
    return {"layers": layers, "mean_relative_change": float(np.mean(moved)), "max_abs_change": largest}


def snap_run(run_dir: Path, data: list[str], out: Path, show_progress: bool = True) -> dict:
    """Write ``out`` (``model.keras``, ``run.json``, ``val_scores.csv``) from ``run_dir``; return ``snapped``."""
    import keras

    from train.evaluate import load_run, score_run

    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise SnapError("--out must be a new folder: the unsnapped run stays as it was")
    run = load_run(run_dir)
    before, _, _ = score_run(run_dir, data, show_progress=show_progress)

    model = keras.models.load_model(run_dir / "model.keras")
    change = snap_model(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")  # scored below, then rewritten

    _, splits, scores = score_run(out, data, show_progress=show_progress)
    y_true = np.array([label == run["positive_label"] for _, split in splits for label in split.labels], dtype=np.int64)
    names = np.concatenate([np.full(len(split.labels), name) for name, split in splits])
    rule = run.get("threshold_rule") or "youden"
    threshold = choose_threshold_by_source(y_true, scores, names, rule)
    after = source_metrics(y_true, scores, names, threshold)

    def summary(metrics: dict, used: float) -> dict:
        return {"threshold": used, "roc_auc": metrics["auc"], "accuracy": metrics["accuracy"],
                "sources": {name: {"roc_auc": m["auc"], "accuracy": m["accuracy"]} for name, m in metrics.get("sources", {}).items()}}

    snapped = {"from_run": str(run_dir), "grid": f"int8 per output channel, symmetric [-{LEVELS}, {LEVELS}], BatchNorm folded",
               **change, "val_before": summary(before, run["threshold"]), "val_after": summary(after, threshold)}
    run.update({"threshold": threshold, "metrics": after, "snapped": snapped})
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    with open(out / "val_scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "label", "positive_probability"])
        rows = [(path, name, label) for name, split in splits for path, label in zip(split.paths, split.labels, strict=True)]
        for (path, name, label), score in zip(rows, scores, strict=True):
            writer.writerow([path, name, label, repr(float(score))])
    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    return snapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.snap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (run.json, model.keras)")
    parser.add_argument("--data", action="append", required=True,
                        help="a source's folder (its val/ is scored) or NAME=FOLDER; repeat for several sources")
    parser.add_argument("--out", type=Path, required=True, help="new run folder to write")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    data = [_val_folder(item) for item in args.data]
    try:
        snapped = snap_run(args.run, data, args.out, not args.quiet)
    except SnapError as error:
        print(f"train.snap: {error}", file=sys.stderr)
        return 1
    before, after = snapped["val_before"], snapped["val_after"]
    print(f"snapped {snapped['layers']} convolutions onto the int8 grid (mean relative change {snapped['mean_relative_change']:.4f})")
    for name in after["sources"]:
        print(f"  {name}: val AUC {before['sources'][name]['roc_auc']:.3f} -> {after['sources'][name]['roc_auc']:.3f}, "
              f"accuracy {before['sources'][name]['accuracy']:.3f} -> {after['sources'][name]['accuracy']:.3f}")
    print(f"  threshold {before['threshold']:.4f} -> {after['threshold']:.4f}; wrote {args.out}")
    return 0


def _val_folder(item: str) -> str:
    """``DATA`` or ``NAME=DATA`` (a source's root) as its val split, named for the source."""
    name, _, folder = item.rpartition("=")
    root = Path(folder)
    return f"{name or root.name}={root / 'val'}"


if __name__ == "__main__":
    sys.exit(main())
