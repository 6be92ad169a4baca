"""``ctpi evaluate``: score a bundle on one or more labelled folders, without TensorFlow (so on
a Pi too). Several folders are several sources (hospitals, data sets): the figures are given
per source and pooled, at the one threshold.

The figures come from :mod:`device.core.metrics`, the same code training and the conversion gate
use, so a number means the same thing wherever it is printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.core.classifier import Classifier
from device.core.dataset import list_examples
from device.core.metrics import binary_metrics, source_metrics
from device.core.preprocess import BadSliceError
from device.tools.progress import progress


@dataclass
class Scores:
    """Positive-class probabilities of every slice that could be read, and those that could not."""

    paths: list[Path] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    positive: list[float] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # by the input guard: not chest CT

    def y_true(self, positive_label: str) -> np.ndarray:
        return np.array([label == positive_label for label in self.labels], dtype=np.int64)


def score_folder(classifier: Classifier, root: Path, show_progress: bool = True) -> Scores:
    examples = list_examples(root, classifier.labels)
    scores = Scores()
    for example in progress(examples, len(examples), f"evaluating {root}", show_progress):
        try:
            prediction = classifier.predict(example.path)
        except BadSliceError as error:
            (scores.refused if error.reason == "not-ct" else scores.failures).append((example.path, str(error)))
            continue
        scores.paths.append(example.path)
        scores.labels.append(example.label)
        scores.positive.append(prediction.positive_probability)
    return scores


def evaluate_folder(classifier: Classifier, root: Path, threshold: float | None = None, show_progress: bool = True):
    """Metrics dict (``n, accuracy, sensitivity, specificity, precision, f1, auc, confusion,
    threshold``) and the underlying :class:`Scores`."""
    scores = score_folder(classifier, root, show_progress)
    if not scores.positive:
        raise ValueError(f"no slice under {root} could be scored")
    used = classifier.threshold if threshold is None else threshold
    metrics = binary_metrics(scores.y_true(classifier.bundle.positive_label), scores.positive, used)
    metrics["refused"] = len(scores.refused)
    return metrics, scores


SPLIT_NAMES = ("train", "val", "validation", "test")


def source_name(folder: Path) -> str:
    """The name a folder is reported under: its own name, or its parent's when it is a split
    (``data/covid-ct/val`` is the source ``covid-ct``)."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name.lower() in SPLIT_NAMES else folder.name


def parse_sources(values: list) -> list[tuple[str, Path]]:
    """``DATA`` arguments as (source name, folder): ``NAME=FOLDER`` names a source explicitly,
    a bare folder is named by :func:`source_name`. Names must differ."""
    sources = []
    for value in values:
        text = str(value)
        name, _, folder = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        sources.append((name or source_name(Path(folder)), Path(folder)))
    names = [name for name, _ in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two data folders are both named {duplicates}: name them with NAME=FOLDER")
    return sources


def evaluate_sources(classifier: Classifier, sources: list[tuple[str, Path]], threshold: float | None = None,
                     show_progress: bool = True) -> tuple[dict, dict[str, Scores]]:
    """Pooled metrics (the keys of :func:`evaluate_folder`, plus ``ece``) with the same figures
    per source under ``"sources"``, each with its ``refused`` count; and the scores by source."""
    by_source = {name: score_folder(classifier, folder, show_progress) for name, folder in sources}
    for (name, folder), scores in zip(sources, by_source.values(), strict=True):
        if not scores.positive:
            raise ValueError(f"no slice under {folder} (source {name}) could be scored")
    positive = classifier.bundle.positive_label
    y = np.concatenate([scores.y_true(positive) for scores in by_source.values()])
    s = np.concatenate([np.asarray(scores.positive, dtype=np.float64) for scores in by_source.values()])
    names = np.concatenate([np.full(len(scores.positive), name) for name, scores in by_source.items()])
    used = classifier.threshold if threshold is None else threshold
    metrics = source_metrics(y, s, names, used)
    metrics["refused"] = sum(len(scores.refused) for scores in by_source.values())
    for name, scores in by_source.items():
        metrics["sources"][name]["refused"] = len(scores.refused)
    return metrics, by_source


def register(subparsers) -> None:
    from device.cli import add_model_arguments, add_threads_argument

    parser = subparsers.add_parser("evaluate", help="accuracy, sensitivity, specificity, AUC... on a labelled folder")
    add_model_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="folder with one subfolder per label (COVID/, NonCOVID/); several folders are several "
                             "sources, each named for its folder (its parent's for train/ or val/) or NAME=FOLDER")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the bundle's)")
    parser.add_argument("--no-guard", action="store_true", help="score every slice, even those the input guard refuses as not chest CT")
    parser.set_defaults(handler=run)


def format_table(metrics: dict, positive_label: str) -> str:
    c = metrics["confusion"]
    rows = [
        ("slices", f"{metrics['n']}"),
        ("threshold", f"{metrics['threshold']:.3f}"),
        ("accuracy", f"{metrics['accuracy']:.3f}"),
        (f"sensitivity ({positive_label})", f"{metrics['sensitivity']:.3f}"),
        ("specificity", f"{metrics['specificity']:.3f}"),
        ("precision", f"{metrics['precision']:.3f}"),
        ("F1", f"{metrics['f1']:.3f}"),
        ("ROC AUC", f"{metrics['auc']:.3f}"),
        ("confusion", f"TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_source_table(metrics: dict) -> str:
    """One row per source and a pooled row, at the shared threshold."""
    header = ("source", "slices", "refused", "accuracy", "sensitivity", "specificity", "ROC AUC", "ECE")
    rows = [
        (name, str(f["n"]), str(f.get("refused", 0)), f"{f['accuracy']:.3f}", f"{f['sensitivity']:.3f}",
         f"{f['specificity']:.3f}", f"{f['auc']:.3f}", f"{f['ece']:.3f}")
        for name, f in [*metrics["sources"].items(), ("pooled", metrics)]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    c = metrics["confusion"]
    lines.append(f"threshold {metrics['threshold']:.3f}; pooled confusion TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}; "
                 f"worst-source AUC {metrics['worst_source_auc']:.3f}")
    return "\n".join(lines)


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold} is not a probability in [0, 1]")
    classifier = Classifier(args.model, args.fmt, args.threads, args.backend, guard=not args.no_guard)
    sources = parse_sources(args.data)
    metrics, by_source = evaluate_sources(classifier, sources, args.threshold, show_progress=not args.json)
    failures = [item for scores in by_source.values() for item in scores.failures]
    refused = [item for scores in by_source.values() for item in scores.refused]
    for path, message in failures:
        print(f"ctpi evaluate: skipped {path}: {message}", file=sys.stderr)
    for path, message in refused:
        print(f"ctpi evaluate: refused {path}: {message}", file=sys.stderr)
    if args.json:
        print_json(metrics)
    else:
        print(f"model {classifier.bundle.describe(classifier.format)} on {', '.join(str(folder) for _, folder in sources)}")
        print(format_table(metrics, classifier.bundle.positive_label) if len(sources) == 1 else format_source_table(metrics))
        if failures:
            print(f"{len(failures)} file(s) could not be read (listed above) and are not counted")
        if refused:
            print(f"{len(refused)} file(s) refused by the input guard as not chest CT (listed above; --no-guard scores them)")
    return EXIT_FAILED_INPUTS if failures else EXIT_OK
