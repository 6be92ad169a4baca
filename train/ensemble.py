"""``python -m train.ensemble``: average several finished runs into one run folder.

On 425 training slices every run memorises train, and runs that differ only in their seed
disagree on many val slices; averaging their probabilities cancels part of that variance.
The members become one Keras graph (shared input, one sub-model per member, an ``Average``
layer of their softmax outputs), so the result is an ordinary ``RUN_DIR``: ``python -m
convert`` turns it into one ``.tflite`` file and the device runs it like any single model,
at the members' summed cost (three int8 MobileNetV2 still take milliseconds).

The members must agree on what a model is (labels, positive label, preprocessing, training
and val data); anything else (seed, recipe) may differ and is recorded per member.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from device.core.metrics import choose_threshold_by_source, source_metrics
from device.core.preprocess import PreprocessSpec
from train import report
from train.data import DataError

log = logging.getLogger(__name__)

MEMBER_PREFIX = "member_"
# What every member must share for an average of their outputs to mean anything.
SHARED_KEYS = ("labels", "positive_label", "preprocessing", "img_size")
SHARED_DATA_KEYS = ("fingerprint", "val_fingerprint")


class EnsembleError(ValueError):
    """Runs that cannot be averaged (unfinished, different labels, data or preprocessing)."""


def read_members(runs: list[Path]) -> list[dict]:
    """``run.json`` of every member, checked to agree with the first one."""
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    if len({Path(run).resolve() for run in runs}) != len(runs):
        raise EnsembleError("a run is listed twice; an ensemble averages distinct runs")
    infos = []
    for run in runs:
        run = Path(run)
        if not (run / "run.json").is_file() or not (run / "model.keras").is_file():
            raise EnsembleError(f"{run} is not a finished training run (needs run.json and model.keras)")
        infos.append(json.loads((run / "run.json").read_text(encoding="utf-8")))
    first = infos[0]
    for run, info in zip(runs[1:], infos[1:], strict=True):
        if info.get("ensemble"):
            raise EnsembleError(f"{run} is itself an ensemble; list its members instead")
        for key in SHARED_KEYS:
            if info.get(key) != first.get(key):
                raise EnsembleError(f"{run} has {key} {info.get(key)!r}, {runs[0]} has {first.get(key)!r}")
        for key in SHARED_DATA_KEYS:
            if info["training_data"].get(key) != first["training_data"].get(key):
                raise EnsembleError(f"{run} was trained or selected on other data than {runs[0]} ({key} differs)")
    if first.get("ensemble"):
        raise EnsembleError(f"{runs[0]} is itself an ensemble; list its members instead")
    return infos


def build_ensemble(members: list, img_shape: tuple[int, int, int], name: str):
    """One graph: the members side by side on a shared input, their softmax outputs averaged.

    Built-in layers only, like a single run's model, so ``load_model`` and the converter need
    nothing special."""
    import keras

    pixels = keras.Input(img_shape, name="pixels")
    outputs = []
    for index, member in enumerate(members):
        # A functional model is re-wrapped under a unique name (every member is "ctpi_<arch>").
        wrapped = keras.Model(member.input, member.output, name=f"{MEMBER_PREFIX}{index}")
        outputs.append(wrapped(pixels))
    averaged = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(pixels, averaged, name=name)


def member_models(model) -> list:
    """The member sub-models of an ensemble graph, in order."""
    return [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]


def ensemble_run(runs: list[Path], data: list[Path] | Path, out: Path, cache_dir: Path | None = Path(".cache/train"),
                 command: str = "", seed: int = 0) -> dict:
    """Build, score on val and write ``out`` as a complete run folder; returns its ``run.json``."""
    started = time.perf_counter()
    runs = [Path(run) for run in runs]
    infos = read_members(runs)
    first = infos[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "run.json").exists():
        log.warning("%s/run.json exists from an earlier run; removed so nobody converts a half-written run", out)
        (out / "run.json").unlink()

    labels, positive = first["labels"], first["positive_label"]
    positive_index = labels.index(positive)
    spec = PreprocessSpec.from_manifest(first["preprocessing"])
    from train.run import load_val

    roots = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    val, val_targets, val_fingerprint = load_val(roots, labels, spec, cache_dir)
    if val_fingerprint != first["training_data"]["val_fingerprint"]:
        raise EnsembleError(f"the val splits of {', '.join(map(str, roots))} are not those the members were selected on")
    y_val = (val_targets == positive_index).astype(np.int64)

    import keras

    from train.callbacks import predict_positive
    from train.gradcam import summary_note
    from train.run import _write_scores

    keras.utils.set_random_seed(seed)
    members = [keras.models.load_model(run / "model.keras", compile=False) for run in runs]
    member_scores = [predict_positive(member, val.pixels, positive_index) for member in members]
    model = build_ensemble(members, (spec.height, spec.width, spec.channels), f"ctpi_{first['architecture']}_ensemble")
    model.save(out / "model.keras")
    val_scores = predict_positive(model, val.pixels, positive_index)
    if not np.allclose(val_scores, np.mean(member_scores, axis=0), atol=1e-5):
        raise AssertionError("the ensemble graph does not compute the mean of its members")  # a Keras regression

    threshold = choose_threshold_by_source(y_val, val_scores, val.sources, first["threshold_rule"])
    val_metrics = source_metrics(y_val, val_scores, val.sources, threshold)
    from device.core.metrics import roc_auc

    member_rows = [
        {
            "run": run.name,
            "seed": info["seed"],
            "val_auc": roc_auc(y_val, scores),
            "val_accuracy": info["metrics"]["val"]["accuracy"],
            "wall_seconds": info["wall_seconds"],
            "initial_weights": info["initial_weights"]["kind"],
        }
        for run, info, scores in zip(runs, infos, member_scores, strict=True)
    ]

    _write_scores(out / "val_scores.csv", val, labels, val_scores)
    _write_member_scores(out / "member_val_scores.csv", val, member_rows, member_scores)
    _plot_members(member_rows, member_scores, y_val, val_metrics, out / "training_curves.png", runs)
    report.plot_roc(y_val, val_scores, val_metrics, out / "roc.png", val.sources)
    report.plot_confusion(val_metrics, positive, labels[1 - positive_index], out / "confusion_matrix.png")
    report.plot_reliability(y_val, val_scores, val_metrics["ece"], positive, out / "reliability.png", val.sources)
    cams = _member_gradcams(members, val, labels, positive_index, y_val, val_scores, threshold, out, seed)

    metrics = {
        "val": val_metrics,
        "threshold_rule": first["threshold_rule"],
        "best_epoch": None,
        "best_stage": "ensemble",
        "epochs_trained": 0,
        "stopped_by_time_budget": False,
        "members": member_rows,
        "gradcam": cams,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    wall = sum(info["wall_seconds"] for info in infos)
    run = {
        "architecture": first["architecture"],
        "labels": labels,
        "positive_label": positive,
        "threshold": threshold,
        "threshold_rule": first["threshold_rule"],
        "preprocessing": first["preprocessing"],
        "img_size": first["img_size"],
        "initial_weights": first["initial_weights"],
        "training_data": first["training_data"],
        "metrics": {"val": val_metrics},
        "seed": first["seed"],  # the first member's; every member's is in "ensemble"
        "wall_seconds": round(wall + time.perf_counter() - started, 1),
        "tensorflow_version": first["tensorflow_version"],
        "keras_version": keras.__version__,
        "recipe": {**first["recipe"], "ensemble_of": len(runs)},
        "ensemble": {"members": member_rows, "commands": [info["command"] for info in infos], "rule": "mean of softmax"},
        "command": command,
    }
    extra = [
        f"An **ensemble of {len(runs)} runs**: one graph that averages the members' probabilities. "
        "Each member was selected on val like a single run; the ensemble adds no training.",
        "",
        "| member | seed | initial weights | val ROC AUC | val accuracy | wall time |",
        "|---|---|---|---|---|---|",
        *[f"| `{row['run']}` | {row['seed']} | {row['initial_weights']} | {row['val_auc']:.3f} | {row['val_accuracy']:.3f} | "
          f"{row['wall_seconds'] / 60:.1f} min |" for row in member_rows],
        "",
        "Member commands (their own run folders hold their curves and reports):",
        "",
        *[f"- `{info['command']}`" for info in infos],
        "",
    ]
    report.write_report(out / "report.md", run, metrics, summary_note(cams), command, extra,
                        curves_caption="Members' val scores (left: ROC per member and ensemble; right: each member's "
                                       "P(COVID) against the ensemble's)")
    partial = out / "run.json.part"
    partial.write_text(json.dumps(run, indent=2))
    partial.replace(out / "run.json")
    return run


def _member_gradcams(members, val, labels, positive_index, y_val, scores, threshold, out: Path, seed: int) -> dict:
    """Grad-CAM of the ensemble: the mean of the members' heatmaps for the ensemble's
    predicted class (each member is a plain single-run graph)."""
    from train.gradcam import gradcam, sample_figures

    def heatmaps(pixels, class_indices):
        return np.mean([gradcam(member, pixels, class_indices) for member in members], axis=0)

    return sample_figures(heatmaps, val, labels, positive_index, y_val, scores, threshold, out, seed)


def _write_member_scores(path: Path, val, rows: list[dict], member_scores: list[np.ndarray]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "label", *[row["run"] for row in rows]])
        for index, (relative, source, label) in enumerate(zip(val.relative, val.sources, val.labels, strict=True)):
            writer.writerow([relative, source, label, *[repr(float(scores[index])) for scores in member_scores]])


def _plot_members(rows, member_scores, y_val, val_metrics, path: Path, runs) -> None:
    from device.core.metrics import roc_curve

    plt = report.pyplot()
    fig, (ax_roc, ax_scatter) = plt.subplots(1, 2, figsize=(11, 4.5))
    ensemble = np.mean(member_scores, axis=0)
    for row, scores in zip(rows, member_scores, strict=True):
        fpr, tpr, _ = roc_curve(y_val, scores)
        ax_roc.plot(fpr, tpr, drawstyle="steps-post", alpha=0.6, label=f"{row['run']} (AUC {row['val_auc']:.3f})")
        ax_scatter.scatter(ensemble, scores, s=8, alpha=0.6, label=row["run"])
    fpr, tpr, _ = roc_curve(y_val, ensemble)
    ax_roc.plot(fpr, tpr, drawstyle="steps-post", color="black", linewidth=2, label=f"ensemble (AUC {val_metrics['auc']:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_roc.set_xlabel("1 - specificity")
    ax_roc.set_ylabel("sensitivity")
    ax_roc.set_title("val ROC: members and ensemble")
    ax_roc.legend(fontsize=7)
    ax_scatter.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_scatter.set_xlabel("ensemble P(positive)")
    ax_scatter.set_ylabel("member P(positive)")
    ax_scatter.set_title("how much the members disagree")
    ax_scatter.legend(fontsize=7)
    for ax in (ax_roc, ax_scatter):
        ax.grid(alpha=0.3)
    report.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.ensemble",
        description="Average finished training runs (same labels, data and preprocessing) into one run folder.",
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="member run folders")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="an ImageFolder the members were trained on (repeat for each source, in the same order)")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--cache", type=lambda value: Path(value) if value else None, default=Path(".cache/train"),
                        help="preprocessed-slice cache folder ('' for none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "train.ensemble", *(argv if argv is not None else sys.argv[1:])])
    try:
        run = ensemble_run(args.runs, args.data, args.out, args.cache, command)
    except (EnsembleError, DataError) as error:
        print(f"train.ensemble: {error}", file=sys.stderr)
        return 2
    val = run["metrics"]["val"]
    print(
        f"{args.out}: ensemble of {len(args.runs)}: val accuracy {val['accuracy']:.3f}, sensitivity {val['sensitivity']:.3f}, "
        f"specificity {val['specificity']:.3f}, AUC {val['auc']:.3f}, threshold {run['threshold']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
