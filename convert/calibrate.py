"""``python -m convert.calibrate``: calibrate a bundle's P(positive) and choose its uncertain band.

Scores the labelled val slices of one or more sources (``--data DIR``, each an ImageFolder
with ``DIR/val/<label>/`` or itself a ``val`` folder) with the bundle's default-format model
through :class:`device.core.classifier.Classifier` (the Pi's code, raw outputs), fits the
calibration map (:mod:`device.core.calibration`), carries the threshold through it (so no decision
changes), chooses the "uncertain — review" band (:mod:`device.core.band`) and rewrites
``manifest.json`` (with every sha256, :func:`device.core.bundle.write_manifest`), ``MODEL_CARD.md``
and ``reliability.svg``. ``python -m convert`` runs the same :func:`calibrate_bundle` on the
bundle it writes. Running it again refits from the model's own outputs: it never compounds.

Exit codes: 0 calibrated, 2 bad bundle, data or flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from device.core.band import MAX_FRACTION, TARGET_ACCURACY, choose_band
from device.core.bundle import BundleError, load_bundle, write_manifest
from device.core.calibration import METHODS, Calibration, CalibrationError, calibration_report, ece_if_calibrated, fit
from device.core.classifier import Classifier
from device.core.dataset import fingerprint, list_examples
from device.core.metrics import expected_calibration_error
from device.core.preprocess import BadSliceError, load_slice
from device.tools.progress import progress

WEIGHTINGS = ("source", "slice")


@dataclass
class SourceScores:
    name: str
    root: Path
    fingerprint: str
    y_true: np.ndarray
    raw: np.ndarray  # the model's P(positive), before calibration
    skipped: int


def val_folder(path: Path) -> Path:
    """``DIR/val`` when it exists, else ``DIR`` itself (a folder of label subfolders)."""
    path = Path(path)
    return path / "val" if (path / "val").is_dir() else path


def source_name(path: Path) -> str:
    path = Path(path).resolve()
    return path.parent.name if path.name == "val" else path.name


def score_source(classifier: Classifier, data: Path, show_progress: bool = True) -> SourceScores:
    """The model's raw P(positive) for every readable val slice of one source."""
    root = val_folder(data)
    examples = list_examples(root, classifier.labels)
    positive = classifier.bundle.positive_index
    y, raw, skipped = [], [], 0
    for example in progress(examples, len(examples), f"scoring {root}", show_progress):
        try:
            pixels = load_slice(example.path, classifier.bundle.spec)
        except BadSliceError as error:
            print(f"convert.calibrate: skipped {example.path}: {error}", file=sys.stderr)
            skipped += 1
            continue
        y.append(example.label == classifier.bundle.positive_label)
        raw.append(float(classifier.raw_probabilities(pixels)[positive]))
    return SourceScores(source_name(data), root, fingerprint(examples, root), np.array(y, np.int64), np.array(raw), skipped)


def choose_map(sources: list[SourceScores], y: np.ndarray, raw: np.ndarray, weights, method: str) -> tuple[Calibration, dict]:
    """The map to apply. ``auto``: of no map, Platt and temperature scaling, the one whose worst
    source's ECE stands least above the ECE an exactly right P shows on as many slices (the
    noise floor; 118 slices show ~0.08 however right P is), because one global map can
    calibrate the pooled slices while making a source worse (measured: the experts ResNet50's São Paulo ECE went from 0.050,
    what an exactly right P shows on 411 slices, to 0.110 under a source-weighted Platt fit);
    a map that helps no source is not applied."""
    if method != "auto":
        return fit(raw, y, method, weights), {}
    candidates = {"identity": Calibration()}
    for name in METHODS:
        try:
            candidates[name] = fit(raw, y, name, weights)
        except CalibrationError:
            continue
    def excess(calibration, source) -> float:
        p = np.asarray(calibration.apply(source.raw))
        return expected_calibration_error(source.y_true, p) - ece_if_calibrated(p, draws=500)["median"]

    worst = {name: max(excess(cal, s) for s in sources) for name, cal in candidates.items()}
    chosen = min(worst, key=worst.get)  # identity first, so a tie keeps the model's own P
    return candidates[chosen], {"rule": "smallest worst-source ECE above what an exactly right P shows on as many slices "
                                        "(val), among no map, platt and temperature",
                                "worst_source_ece": {name: round(value, 4) for name, value in worst.items()}}


def calibrate_bundle(
    bundle_path: str | Path,
    data: list[Path],
    method: str = "auto",
    weighting: str = "source",
    max_fraction: float = MAX_FRACTION,
    target_accuracy: float = TARGET_ACCURACY,
    command: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Calibrate the bundle in place (model files untouched) and return its new ``calibration``
    manifest entry. ``weighting`` ``source`` makes every source count equally in the fit."""
    from convert.calibration_card import RELIABILITY_FILE, calibration_section, with_calibration_section
    from device.tools.plots import reliability_svg

    if weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting {weighting!r}: choose one of {WEIGHTINGS}")
    if not data:
        raise ValueError("calibration needs at least one --data folder")
    bundle = load_bundle(bundle_path)
    manifest = dict(bundle.manifest)
    classifier = Classifier(bundle, bundle.default_format, threads=None)
    sources = [score_source(classifier, Path(folder), show_progress) for folder in data]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"two --data folders have the same name {names}: rename one")
    for source in sources:
        if source.y_true.size == 0 or source.y_true.min() == source.y_true.max():
            raise ValueError(f"{source.root} needs readable slices of both labels to calibrate on")
    y = np.concatenate([s.y_true for s in sources])
    raw = np.concatenate([s.raw for s in sources])
    weights = np.concatenate([np.full(s.y_true.size, 1.0 / s.y_true.size) for s in sources]) if weighting == "source" else None
    calibration, choice = choose_map(sources, y, raw, weights, method)
    previous = manifest.get("calibration") or {}
    raw_threshold = float(previous.get("raw_threshold", manifest["threshold"]))
    threshold = float(calibration.apply(raw_threshold))
    calibrated = {s.name: np.asarray(calibration.apply(s.raw)) for s in sources}
    groups = {s.name: (s.y_true, s.raw, calibrated[s.name]) for s in sources}
    if len(sources) > 1:
        groups["pooled"] = (y, raw, np.concatenate(list(calibrated.values())))
    reliability = {
        name: {"before": calibration_report(truth, before), "after": calibration_report(truth, after)}
        for name, (truth, before, after) in groups.items()
    }
    band, band_info = choose_band({s.name: (s.y_true, calibrated[s.name]) for s in sources}, threshold, max_fraction, target_accuracy)
    entry = {
        "method": calibration.method,
        "a": calibration.a,
        "b": calibration.b,
        "positive_label": bundle.positive_label,
        "format": classifier.format,
        "model_sha256": classifier.sha256,
        "raw_threshold": raw_threshold,
        "threshold_rule": "the model-scale threshold carried through the map (decisions unchanged)",
        "weighting": "each source weighs equally" if weighting == "source" else "each slice weighs equally",
        "fitted_on": {
            "n": int(y.size),
            "sources": {
                s.name: {"fingerprint": s.fingerprint, "n": int(s.y_true.size), "positive": int(s.y_true.sum()), "skipped": s.skipped}
                for s in sources
            },
        },
        "sources": names,
        **({"choice": choice} if choice else {}),
        "ece_before": {name: r["before"]["ece"] for name, r in reliability.items()},
        "ece_after": {name: r["after"]["ece"] for name, r in reliability.items()},
        "reliability": reliability,
        "band": {**band_info, "max_fraction": max_fraction, "target_accuracy": target_accuracy},
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"python -m convert.calibrate --bundle {bundle.path} " + " ".join(f"--data {d}" for d in data),
    }
    manifest["threshold"] = threshold
    manifest["calibration"] = entry
    manifest["uncertain_band"] = band.to_manifest()
    svg = reliability_svg({name: r["after"]["bins"] for name, r in reliability.items()}, "Reliability after calibration (val)")
    (bundle.path / RELIABILITY_FILE).write_text(svg + "\n", encoding="utf-8")
    card_path = bundle.path / "MODEL_CARD.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else f"# Model card: {bundle.name}\n"
    card = with_calibration_section(card, calibration_section(entry, band.to_manifest(), threshold), threshold, raw_threshold)
    card_path.write_text(card, encoding="utf-8")
    write_manifest(bundle.path, manifest)
    load_bundle(bundle.path)  # proves the result verifies
    return entry


def summary(entry: dict, band: list[float], threshold: float) -> str:
    lines = [
        f"calibration {entry['method']}: a={entry['a']:.4f} b={entry['b']:.4f}; threshold {entry['raw_threshold']:.4f} "
        f"-> {threshold:.4f} (calibrated); uncertain band [{band[0]:.4f}, {band[1]:.4f})",
        f"{'source':<16} {'n':>5} {'ECE before':>10} {'ECE after':>9} {'if calibrated':>13} {'in band':>8} {'acc outside':>11} {'acc (no band)':>13}",
    ]
    for name, after in entry["ece_after"].items():
        figures = entry["band"]["figures"].get(name, {})
        lines.append(
            f"{name:<16} {entry['reliability'][name]['after']['n']:>5} {entry['ece_before'][name]:>10.3f} {after:>9.3f} "
            f"{(entry['reliability'][name]['after'].get('ece_if_calibrated') or {}).get('median') or float('nan'):>13.3f} "
            f"{figures.get('fraction_in_band', float('nan')):>8.1%} {figures.get('accuracy_outside', float('nan')):>11.3f} "
            f"{figures.get('accuracy_all', float('nan')):>13.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder to calibrate in place")
    parser.add_argument("--data", type=Path, action="append", required=True, help="labelled source: DIR/val/<label>/ (repeat per source)")
    parser.add_argument("--method", choices=("auto", *METHODS), default="auto",
                        help="auto (default: of no map, platt and temperature, the smallest worst-source ECE above its noise floor), platt (slope and offset) or temperature (slope only)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="source", help="source: every source counts equally in the fit (default); slice: every slice")
    parser.add_argument("--max-band-fraction", type=float, default=MAX_FRACTION, help=f"most val slices of any source in the band (default {MAX_FRACTION})")
    parser.add_argument("--target-accuracy", type=float, default=TARGET_ACCURACY, help=f"accuracy outside the band to reach (default {TARGET_ACCURACY})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        entry = calibrate_bundle(
            args.bundle, args.data, args.method, args.weighting, args.max_band_fraction, args.target_accuracy,
            command="python -m convert.calibrate " + shlex.join(argv),
        )
    except (BundleError, CalibrationError, FileNotFoundError, ValueError) as error:
        print(f"convert.calibrate: {error}", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    print(summary(entry, bundle.manifest["uncertain_band"], bundle.threshold))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
