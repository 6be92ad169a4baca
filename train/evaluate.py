"""``python -m train.evaluate --run RUN_DIR --data SPLIT_DIR [--data ...]``: score a Keras run on
any ImageFolder splits (several = several sources, figures per source and pooled) with the same
metrics code ``ctpi evaluate`` uses.

The run's own preprocessing spec, labels, positive label and threshold come from its
``run.json``; nothing is assumed. Exit status: 0 scored, 1 some slices could not be read,
2 bad run folder or data.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from device.core.metrics import source_metrics
from device.core.preprocess import PreprocessSpec
from device.tools.evaluate import format_source_table, format_table, parse_sources
from train.data import DataError, load_split


class RunError(ValueError):
    """A run folder that cannot be scored (missing or incomplete ``run.json``/``model.keras``)."""


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    manifest = run_dir / "run.json"
    if not manifest.is_file() or not (run_dir / "model.keras").is_file():
        raise RunError(f"{run_dir} is not a complete training run (needs run.json and model.keras)")
    return json.loads(manifest.read_text())


def score_run(run_dir: Path, data, threshold: float | None = None, cache_dir: Path | None = None,
              show_progress: bool = True) -> tuple[dict, list, np.ndarray]:
    """Metrics (pooled ``binary_metrics`` + ``ece``, per source under ``sources``), the scored
    ``(source name, split)`` pairs and the positive probabilities of all their slices in order.
    ``data``: one split folder or a list of them (``NAME=FOLDER`` names a source)."""
    import keras

    from train.callbacks import predict_positive

    run = load_run(run_dir)
    labels, positive = run["labels"], run["positive_label"]
    spec = PreprocessSpec.from_manifest(run["preprocessing"])
    try:
        folders = parse_sources(data if isinstance(data, (list, tuple)) else [data])
    except ValueError as error:
        raise DataError(str(error)) from None
    splits = [(name, load_split(folder, labels, spec, cache_dir, show_progress)) for name, folder in folders]
    model = keras.models.load_model(Path(run_dir) / "model.keras")
    scores = np.concatenate([predict_positive(model, split.pixels, labels.index(positive)) for _, split in splits])
    y_true = np.array([label == positive for _, split in splits for label in split.labels], dtype=np.int64)
    names = np.concatenate([np.full(len(split.labels), name) for name, split in splits])
    used = run["threshold"] if threshold is None else threshold
    return source_metrics(y_true, scores, names, used), splits, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (run.json, model.keras)")
    parser.add_argument("--data", action="append", required=True,
                        help="ImageFolder split: DATA/<label>/* (repeat for several sources; NAME=FOLDER names one)")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the run's)")
    parser.add_argument("--scores", type=Path, default=None, help="write path,source,label,positive_probability CSV here")
    parser.add_argument("--cache", type=Path, default=None, help="preprocessed-slice cache folder (default: none)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics, splits, scores = score_run(args.run, args.data, args.threshold, args.cache, not args.quiet)
        positive = load_run(args.run)["positive_label"]
    except (RunError, DataError) as error:
        print(f"train.evaluate: {error}", file=sys.stderr)
        return 2
    rows = [(path, name, label) for name, split in splits for path, label in zip(split.paths, split.labels, strict=True)]
    if args.scores:
        with open(args.scores, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "source", "label", "positive_probability"])
            for (relative, name, label), score in zip(rows, scores, strict=True):
                writer.writerow([relative, name, label, repr(float(score))])
    skipped = [(name, relative, reason) for name, split in splits for relative, reason in split.skipped]
    if args.json:
        print(json.dumps({**metrics, "skipped": [list(item) for item in skipped]}, indent=2))
    else:
        if len(splits) == 1:
            print(format_table(metrics, positive))
            print(f"expected calibration error  {metrics['ece']:.3f}")
        else:
            print(format_source_table(metrics))
        for name, relative, reason in skipped:
            print(f"skipped {name}/{relative}: {reason}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
