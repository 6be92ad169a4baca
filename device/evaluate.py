"""``ctpi evaluate``: score a bundle on an ImageFolder, without TensorFlow (so on a Pi too).

The figures come from :mod:`device.metrics`, the same code training and the conversion gate
use, so a number means the same thing wherever it is printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.classifier import Classifier
from device.dataset import list_examples
from device.metrics import binary_metrics
from device.preprocess import BadSliceError
from device.progress import progress


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


def register(subparsers) -> None:
    from device.cli import add_model_arguments, add_threads_argument

    parser = subparsers.add_parser("evaluate", help="accuracy, sensitivity, specificity, AUC... on a labelled folder")
    add_model_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("data", type=Path, metavar="DATA", help="folder with one subfolder per label (COVID/, NonCOVID/)")
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


def run(args) -> int:
    from device.cli import EXIT_FAILED_INPUTS, EXIT_OK, print_json

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold} is not a probability in [0, 1]")
    classifier = Classifier(args.model, args.fmt, args.threads, args.backend, guard=not args.no_guard)
    metrics, scores = evaluate_folder(classifier, args.data, args.threshold, show_progress=not args.json)
    for path, message in scores.failures:
        print(f"ctpi evaluate: skipped {path}: {message}", file=sys.stderr)
    for path, message in scores.refused:
        print(f"ctpi evaluate: refused {path}: {message}", file=sys.stderr)
    if args.json:
        print_json(metrics)
    else:
        print(f"model {classifier.bundle.describe(classifier.format)} on {args.data}")
        print(format_table(metrics, classifier.bundle.positive_label))
        if scores.failures:
            print(f"{len(scores.failures)} file(s) could not be read (listed above) and are not counted")
        if scores.refused:
            print(f"{len(scores.refused)} file(s) refused by the input guard as not chest CT (listed above; --no-guard scores them)")
    return EXIT_FAILED_INPUTS if scores.failures else EXIT_OK
