"""``python -m convert.framing``: how a bundle scores val slices framed as a scanner exports them.

Why: both training sources come cropped to the body's edges, but a hospital's scanner or PACS
export is a square frame of air around the body, often with the table under it, in whatever
window the viewer had. The input guard was fitted to accept such frames; this measures whether
the *model* still answers on them. It found that the bundles made with preprocessing version 1
(the whole image letterboxed) scored São Paulo's val slices at chance once framed (ROC AUC 0.53
against 0.96 as they are), which is why version 2 crops to the body first.

Each val slice of every source is scored as it is and in three framings
(:func:`convert.reframe.reframe`, a fixed seed per slice): in a 512 x 512 frame of air at
40-70 %; the same with a table line under it; and re-framed at random (half turned by up to 12
degrees, half with a table, half re-windowed). The guard is off (every copy is scored; its
acceptance of the same copies is in the guard's figures), and the bundle's calibrated P and
threshold decide. ``python -m convert`` runs it on the default format and writes the figures
into ``manifest.json`` (``metrics.framing``) and the model card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from convert.calibrate import source_name, val_folder
from convert.model_card import with_marked_section
from convert.reframe import reframe
from device.core.bundle import BundleError, load_bundle, write_manifest
from device.core.classifier import Classifier
from device.core.dataset import list_examples
from device.core.metrics import binary_metrics
from device.core.preprocess import BadSliceError, decode_slice, prepare
from device.tools.progress import progress

SEED = 11  # the framing of val slice i is drawn from (SEED, i): the same copies for every bundle
FRAMINGS = {
    "as exported": None,
    "framed in air": {"table": False, "rewindow": False, "tilt": False},
    "framed, table under it": {"table": True, "rewindow": False, "tilt": False},
    "re-framed at random": {},
}
SECTION_START, SECTION_END = "<!-- section:framing -->", "<!-- /section:framing -->"


def _framed(pixels: np.ndarray, how: dict | None, index: int) -> np.ndarray:
    if how is None:
        return pixels
    return reframe(pixels, np.random.default_rng([SEED, index]), **how).astype(np.float32)


def measure(classifier: Classifier, data: list[Path], show_progress: bool = True) -> dict:
    """``{source: {framing: binary metrics at the bundle's threshold, n}}`` of every readable val slice."""
    bundle = classifier.bundle
    positive = bundle.positive_index
    figures = {}
    for root in data:
        val, name = val_folder(root), source_name(root)
        examples = list_examples(val, bundle.labels)
        y, scores = [], {framing: [] for framing in FRAMINGS}
        for index, example in enumerate(progress(examples, len(examples), f"framing {val}", show_progress)):
            try:
                pixels = decode_slice(example.path, bundle.spec).pixels
            except BadSliceError as error:
                print(f"convert.framing: skipped {example.path}: {error}", file=sys.stderr)
                continue
            y.append(example.label == bundle.positive_label)
            for framing, how in FRAMINGS.items():
                prepared = prepare(_framed(pixels, how, index), bundle.spec)
                scores[framing].append(float(classifier.probabilities(prepared)[positive]))
        figures[name] = {framing: {**_rounded(binary_metrics(np.array(y, int), np.array(s), classifier.threshold)), "n": len(y)}
                         for framing, s in scores.items()}
    return figures


def _rounded(metrics: dict) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}


def table(figures: dict) -> list[str]:
    """Markdown rows: one per framing, a cell per source (accuracy / AUC / sensitivity / specificity)."""
    sources = list(figures)
    lines = ["| slice | " + " | ".join(f"{name} val (n {next(iter(figures[name].values()))['n']})" for name in sources) + " |",
             "|---|" + "---|" * len(sources)]
    for framing in FRAMINGS:
        cells = [figures[name][framing] for name in sources]
        lines.append(f"| {framing} | " + " | ".join(
            f"{c['accuracy']:.3f} / {c['auc']:.3f} / {c['sensitivity']:.3f} / {c['specificity']:.3f}" for c in cells) + " |")
    return lines


def section(figures: dict, fmt: str, preprocessing: dict, command: str) -> str:
    """The model card's section."""
    crop = preprocessing.get("crop", "none")
    return "\n".join([
        SECTION_START,
        "## Slices framed as a scanner exports them",
        "",
        f"The {fmt} model on each val slice as it is and framed as a scanner or PACS export would frame it "
        "(a 512 x 512 frame of air with the body at 40-70 %; with a table line under it; re-framed at random: half "
        "turned by up to 12 degrees, half with a table, half re-windowed), at the bundle's threshold, guard off. "
        "Each cell is accuracy / ROC AUC / sensitivity / specificity.",
        "",
        *table(figures),
        "",
        f"Preprocessing version {preprocessing.get('version')}, crop `{crop}`"
        + (": every slice is cropped to the body before it is letterboxed, so the frame of air and most of the "
           "table do not reach the model." if crop == "body" else
           ": the whole image is letterboxed, so the frame of air reaches the model."),
        "",
        f"Measured with: `{command}`",
        SECTION_END,
        "",
    ])


def record(bundle_path: Path, data: list[Path], fmt: str | None = None, command: str | None = None,
           show_progress: bool = True) -> dict:
    """Measure, then write the figures into the manifest (``metrics.framing``) and the card."""
    classifier = Classifier(bundle_path, fmt, guard=False)
    figures = measure(classifier, data, show_progress)
    command = command or "python -m convert.framing --bundle BUNDLE " + " ".join(f"--data {Path(d).name}" for d in data)
    bundle = classifier.bundle
    manifest = dict(bundle.manifest)
    manifest["metrics"] = {**manifest.get("metrics", {}),
                           "framing": {"format": classifier.format, "seed": SEED, "command": command, "sources": figures}}
    card_path = bundle.path / "MODEL_CARD.md"
    if card_path.is_file():
        text = section(figures, classifier.format, bundle.manifest["preprocessing"], command)
        card_path.write_text(with_marked_section(card_path.read_text(encoding="utf-8"), SECTION_START, SECTION_END, text),
                             encoding="utf-8")
    write_manifest(bundle.path, manifest)  # re-hashes the card too
    load_bundle(bundle.path)  # the result must verify
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.framing", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--data", type=Path, required=True, action="append", help="an ImageFolder per source (its val/ is read; repeat)")
    parser.add_argument("--format", default=None, help="model format (default: the bundle's default)")
    parser.add_argument("--write", action="store_true", help="record the figures in the manifest and the model card")
    parser.add_argument("--json", action="store_true", help="figures as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.write:
            command = "python -m convert.framing " + " ".join(
                ["--bundle", str(args.bundle), *(f"--data {d}" for d in args.data), *(["--format", args.format] if args.format else [])])
            figures = record(args.bundle, args.data, args.format, command, not args.quiet)
        else:
            figures = measure(Classifier(args.bundle, args.format, guard=False), args.data, not args.quiet)
    except (OSError, ValueError, BundleError) as error:
        print(f"convert.framing: {error}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=1) if args.json else "\n".join(table(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
