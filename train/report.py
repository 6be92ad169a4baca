"""The pictures and the ``report.md`` of a run: training curves, ROC, confusion matrix,
reliability diagram and Grad-CAM overlays, all computed from ``device.core.metrics`` figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from device.core.metrics import reliability_bins, roc_curve

log = logging.getLogger(__name__)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and release a figure (pyplot keeps every open figure in memory)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_history(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [row["loss"] for row in rows], label="train loss (augmented)")
    ax_loss.plot(epochs, [row["val_loss"] for row in rows], label="val loss")
    per_source = sorted({key for row in rows for key in row if key.startswith("val_auc_") and key != "val_auc_pooled"})
    ax_auc.plot(epochs, [row["val_auc"] for row in rows], label="val ROC AUC" + (" (worst source)" if per_source else ""),
                color="C2", linewidth=2.2)
    for index, key in enumerate(per_source):
        ax_auc.plot(epochs, [row.get(key, float("nan")) for row in rows], label=f"val ROC AUC, {key[8:]}",
                    color=f"C{4 + index}", linestyle="--", linewidth=1)
    ax_auc.plot(epochs, [row["val_accuracy_at_half"] for row in rows], label="val accuracy at 0.5", color="C3")
    stage_changes = [rows[i]["epoch"] - 0.5 for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
    for ax in (ax_loss, ax_auc):
        for x in stage_changes:
            ax.axvline(x, color="grey", linestyle=":", label="head → fine-tune")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax_loss.set_title("loss")
    ax_auc.set_title("validation")
    save_figure(fig, path)


def _by_source(y_true, scores, sources) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, y, scores) per source in data-folder order, then "pooled" when there are several."""
    y, s = np.asarray(y_true), np.asarray(scores)
    if sources is None:
        return [("val", y, s)]
    groups = np.asarray(sources)
    _, first = np.unique(groups, return_index=True)
    names = [str(groups[i]) for i in sorted(first)]
    parts = [(name, y[groups == name], s[groups == name]) for name in names]
    return parts + [("pooled", y, s)] if len(parts) > 1 else parts


def _figures_for(metrics: dict, name: str) -> dict:
    return metrics.get("sources", {}).get(name, metrics)


def plot_roc(y_true, scores, metrics: dict, path: Path, sources=None) -> None:
    """ROC curves on one plot: one per source (``sources``: a name per slice) and pooled,
    each with its operating point at the one shared threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    for index, (name, y, s) in enumerate(_by_source(y_true, scores, sources)):
        figures = _figures_for(metrics, name)
        fpr, tpr, _ = roc_curve(y, s)
        style = {"color": "black", "linestyle": "--"} if name == "pooled" else {"color": f"C{index}"}
        ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name}: AUC {figures['auc']:.3f}", **style)
        ax.scatter([1 - figures["specificity"]], [figures["sensitivity"]], zorder=3, color=style["color"], marker="o")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, val (dots: threshold {metrics['threshold']:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_confusion(metrics: dict, positive: str, negative: str, path: Path) -> None:
    """Confusion matrices at the shared threshold: one per source and pooled."""
    plt = pyplot()
    panels = [(name, figures) for name, figures in metrics.get("sources", {}).items()]
    panels = panels + [("pooled", metrics)] if len(panels) > 1 else [("val", metrics)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8), squeeze=False)
    for ax, (name, figures) in zip(axes[0], panels, strict=True):
        c = figures["confusion"]
        matrix = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14,
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], [positive, negative])
        ax.set_yticks([0, 1], [positive, negative])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}, threshold {metrics['threshold']:.3f}", fontsize=9)
    save_figure(fig, path)


def plot_reliability(y_true, scores, ece: float, positive: str, path: Path, sources=None) -> None:
    """Reliability diagrams: one per source and pooled, each with its ECE."""
    from device.core.metrics import expected_calibration_error

    plt = pyplot()
    panels = _by_source(y_true, scores, sources)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (name, y, s) in zip(axes[0], panels, strict=True):
        bins = [b for b in reliability_bins(y, s) if b["count"]]
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["observed_rate"] for b in bins], width=0.09,
               alpha=0.7, label="observed rate")
        ax.plot([b["mean_probability"] for b in bins], [b["observed_rate"] for b in bins], "o-", color="C3",
                label="mean predicted")
        for b in bins:
            ax.text((b["low"] + b["high"]) / 2, 0.02, str(b["count"]), ha="center", fontsize=7)
        ax.set_xlabel(f"predicted P({positive})")
        ax.set_ylabel(f"fraction {positive}")
        panel_ece = ece if name in ("val", "pooled") else expected_calibration_error(y, s)
        ax.set_title(f"reliability, {name} (ECE {panel_ece:.3f})", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_gradcam(pixels: np.ndarray, cams: np.ndarray, titles: list[str], path: Path, columns: int = 4) -> None:
    plt = pyplot()
    rows = max(1, int(np.ceil(len(pixels) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, cam, title in zip(axes.ravel()[: len(pixels)], pixels, cams, titles, strict=True):
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(path: Path, run: dict, metrics: dict, gradcam_note: str, command: str, extra: list[str],
                 curves_caption: str = "") -> None:
    """``report.md``: the figures, their provenance and the pictures, for a person to read."""
    val = metrics["val"]
    c = val["confusion"]
    weights = run["initial_weights"]
    lines = [
        f"# Training run: {run['architecture']} ({run['img_size']}×{run['img_size']})",
        "",
        f"- Initial weights: **{weights['kind']}** — {weights['description']}"
        + (f" (file `{weights['file']}`, sha256 `{weights['sha256']}`)" if weights["file"] else ""),
        *data_lines(run["training_data"]),
        f"- Command: `{command}`",
        f"- Seed {run['seed']}, wall time {run['wall_seconds'] / 60:.1f} min, TensorFlow {run['tensorflow_version']}, "
        f"Keras {run['keras_version']}",
        _selection_line(metrics, len(val.get("sources", {})) > 1),
        "",
        "## Validation figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| slices | {val['n']} |",
        f"| accuracy | {val['accuracy']:.3f} |",
        f"| sensitivity ({run['positive_label']}) | {val['sensitivity']:.3f} |",
        f"| specificity | {val['specificity']:.3f} |",
        f"| precision | {val['precision']:.3f} |",
        f"| F1 | {val['f1']:.3f} |",
        f"| ROC AUC | {val['auc']:.3f} |",
        f"| expected calibration error (10 bins) | {val['ece']:.3f} |",
        f"| threshold ({run['threshold_rule']}) | {val['threshold']:.4f} |",
        f"| confusion (tp, fn, fp, tn) | {c['tp']}, {c['fn']}, {c['fp']}, {c['tn']} |",
        "",
        *source_table(val, run["positive_label"]),
        "Val chose the checkpoint and the threshold, so these figures are optimistic for unseen data; "
        "the held-back official test split is the honest measure.",
        "",
        *extra,
        *([] if "experts" in metrics else [
            "## Training curves" if metrics["best_epoch"] is not None else "## Members",
            "",
            *([curves_caption, ""] if curves_caption else []),
            "![training curves](training_curves.png)",
            "",
        ]),
        "## ROC, confusion matrix, reliability",
        "",
        "![ROC](roc.png) ![confusion matrix](confusion_matrix.png) ![reliability](reliability.png)",
        "",
        "## Grad-CAM (val)",
        "",
        gradcam_note,
        "",
        "![Grad-CAM](gradcam.png)",
        "",
        "## Recipe",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in run["recipe"].items()],
        "",
    ]
    path.write_text("\n".join(lines))


def _selection_line(metrics: dict, several_sources: bool) -> str:
    if "experts" in metrics:
        return "- Frozen backbone, experts head fitted in one step (no epochs; see the head's note below)"
    if metrics["best_epoch"] is None:
        return f"- Ensemble of {len(metrics.get('members', []))} runs, each selected on val ROC AUC"
    return (f"- Best checkpoint: epoch {metrics['best_epoch']} ({metrics['best_stage']} stage), selected on val ROC AUC"
            + (" of the worst source" if several_sources else ""))


def data_lines(training_data: dict) -> list[str]:
    """The report's data lines: every source with its fingerprints and counts."""
    sources = training_data.get("sources")
    if not sources:
        return [f"- Data: `{training_data['name']}`, train fingerprint `{training_data['fingerprint'][:16]}…`, "
                f"counts {training_data['counts']}"]
    lines = [f"- Data: {len(sources)} sources, batches balanced over source × label ({training_data.get('sampler', '')})"]
    for source in sources:
        lines.append(f"  - `{source['name']}`: train fingerprint `{source['fingerprint'][:16]}…`, val fingerprint "
                     f"`{source['val_fingerprint'][:16]}…`, counts {source['counts']}")
    return lines


def source_table(val: dict, positive: str) -> list[str]:
    """Per-source figures at the one shared threshold (nothing for a single source)."""
    sources = val.get("sources", {})
    if len(sources) < 2:
        return []
    lines = [
        "### Per source (one threshold for all)",
        "",
        f"| source | slices | accuracy | sensitivity ({positive}) | specificity | ROC AUC | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in [*sources.items(), ("**pooled**", val)]:
        lines.append(f"| {name} | {f['n']} | {f['accuracy']:.3f} | {f['sensitivity']:.3f} | {f['specificity']:.3f} | "
                     f"{f['auc']:.3f} | {f['ece']:.3f} |")
    return [*lines, "", f"Worst-source ROC AUC: **{val['worst_source_auc']:.3f}**", ""]
