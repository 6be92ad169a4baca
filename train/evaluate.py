"""``python -m train.evaluate --run RUN_DIR --data SPLIT_DIR``: score a Keras run on any
ImageFolder split with the same metrics code ``ctpi evaluate`` uses.

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

from device.evaluate import format_table
from device.metrics import binary_metrics, expected_calibration_error
from device.preprocess import PreprocessSpec
from train.data import DataError, load_split


class RunError(ValueError):
    """A run folder that cannot be scored (missing or incomplete ``run.json``/``model.keras``)."""


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    manifest = run_dir / "run.json"
    if not manifest.is_file() or not (run_dir / "model.keras").is_file():
        raise RunError(f"{run_dir} is not a complete training run (needs run.json and model.keras)")
    return json.loads(manifest.read_text())


def score_run(run_dir: Path, data: Path, threshold: float | None = None, cache_dir: Path | None = None,
              show_progress: bool = True) -> tuple[dict, object, np.ndarray]:
    """Metrics (``binary_metrics`` + ``ece``), the scored split and its positive probabilities."""
    import keras

    from train.callbacks import predict_positive

    run = load_run(run_dir)
    labels, positive = run["labels"], run["positive_label"]
    spec = PreprocessSpec.from_manifest(run["preprocessing"])
    split = load_split(Path(data), labels, spec, cache_dir, show_progress)
    model = keras.models.load_model(Path(run_dir) / "model.keras")
    scores = predict_positive(model, split.pixels, labels.index(positive))
    y_true = np.array([label == positive for label in split.labels], dtype=np.int64)
    used = run["threshold"] if threshold is None else threshold
    metrics = binary_metrics(y_true, scores, used)
    metrics["ece"] = expected_calibration_error(y_true, scores)
    return metrics, split, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="training run folder (run.json, model.keras)")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder split: DATA/<label>/*")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the run's)")
    parser.add_argument("--scores", type=Path, default=None, help="write path,label,positive_probability CSV here")
    parser.add_argument("--cache", type=Path, default=None, help="preprocessed-slice cache folder (default: none)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics, split, scores = score_run(args.run, args.data, args.threshold, args.cache, not args.quiet)
        positive = load_run(args.run)["positive_label"]
    except (RunError, DataError) as error:
        print(f"train.evaluate: {error}", file=sys.stderr)
        return 2
    if args.scores:
        with open(args.scores, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "positive_probability"])
            for relative, label, score in zip(split.paths, split.labels, scores, strict=True):
                writer.writerow([relative, label, repr(float(score))])
    if args.json:
        print(json.dumps({**metrics, "skipped": [list(pair) for pair in split.skipped]}, indent=2))
    else:
        print(format_table(metrics, positive))
        print(f"expected calibration error  {metrics['ece']:.3f}")
        for relative, reason in split.skipped:
            print(f"skipped {relative}: {reason}", file=sys.stderr)
    return 1 if split.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
