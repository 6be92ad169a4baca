"""Fit the input guard of a bundle (``guard.json``), measure it, and put its figures in the card.

    python -m convert.guard --bundle models/mobilenetv2 --data DATA_A --data DATA_B
    python -m convert.guard --report --bundle models/mobilenetv2 --data DATA_A --data DATA_B

Each ``--data`` folder is one training source (an ImageFolder: ``train/<label>/*``, ``val/...``).
The guard is fitted on the **train** slices only, each as it is and twice re-framed as a scanner
or PACS exports it (:mod:`convert.reframe`: pasted into a 512 x 512 frame of air, sometimes with
a table under it, sometimes re-windowed), because the sources are cropped tight to the body and a
hospital's files often are not. Per source, ``--components`` Gaussians (k-means on the
standardised features; one source holds figures in several windows and crops) with shrunk
covariances each accept up to the ``--quantile`` of their own slices' squared Mahalanobis
distances times ``--margin``. The figures are then measured: acceptance per source on train, val
and val re-framed (other random framings, never fitted), and refusal per category on the
negatives of :mod:`convert.guard_negatives` (never used for fitting, so they measure, not tune).
``guard.json`` is written into the bundle, the manifest re-hashed (so an edited guard is refused
like an edited model) and the card's guard section rewritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from convert.model_card import with_marked_section
from convert.reframe import TILT_DEGREES, reframed_files, soft_tissue_files, turned_files
from device.core.bundle import Bundle, load_bundle, write_manifest
from device.core.dataset import is_candidate
from device.core.guard import FEATURE_NAMES, FEATURE_VERSION, GUARD_FILE, Guard, SourceModel, features
from device.core.preprocess import BadSliceError, decode_slice

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 99.5
DEFAULT_MARGIN = 1.0
DEFAULT_SHRINKAGE = 0.1
DEFAULT_COMPONENTS = 3  # 2 before the re-framed slices were also turned (tilt): 3 fit their wider spread
KMEANS_STARTS = 5
FRAMED_COPIES = 2  # re-framings of each train slice fitted besides the slice as it is
FIT_FRAMING_SEEDS, MEASURE_FRAMING_SEED = (2, 3), 1  # re-framings of train (fitted) and of val (measured)
REFRAMED = "val re-framed"  # the split name of the re-framed val slices in the figures
TURN_DEGREES = 10.0  # val slices measured turned by this much, either way, as they are
TURNED = f"val turned {TURN_DEGREES:g}°"
SOFT = "val soft-tissue window"
SOFT_SUFFIX = " (soft-tissue window)"  # the fitted group of a source's train slices in that window
GUARD_START, GUARD_END = "<!-- section:guard -->", "<!-- /section:guard -->"


def slice_files(root: Path, split: str) -> list[Path]:
    folder = Path(root) / split
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_candidate(p)) if folder.is_dir() else []


def feature_matrix(sources, spec=None) -> tuple[np.ndarray, int]:
    """Features of every file (paths or bytes) that decodes, and how many did not; DICOM is
    windowed as the bundle's preprocessing ``spec`` says, as the Pi will."""
    rows, failed = [], 0
    for source in sources:
        try:
            rows.append(features(decode_slice(source, spec)))
        except BadSliceError:
            failed += 1
    return (np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)))), failed


def fit_source(name: str, values: np.ndarray, quantile: float, margin: float, shrinkage: float) -> SourceModel:
    if len(values) < len(FEATURE_NAMES) + 2:
        raise ValueError(f"source {name}: {len(values)} train slices are too few to fit the guard (need {len(FEATURE_NAMES) + 2})")
    mean = values.mean(axis=0)
    covariance = np.cov(values, rowvar=False)
    covariance = (1 - shrinkage) * covariance + shrinkage * np.diag(np.diag(covariance)) + 1e-6 * np.eye(len(mean))
    precision = np.linalg.inv(covariance)
    delta = values - mean
    distances = np.einsum("ij,jk,ik->i", delta, precision, delta)
    return SourceModel(name, mean, precision, float(np.percentile(distances, quantile) * margin))


def _kmeans(scaled: np.ndarray, k: int, seed: int, rounds: int) -> tuple[np.ndarray, float] | None:
    """Labels and within-cluster sum of squares of one k-means run from a k-means++ start."""
    rng = np.random.default_rng(seed)
    centres = [scaled[rng.integers(len(scaled))]]
    for _ in range(1, k):
        nearest = np.min([((scaled - c) ** 2).sum(axis=1) for c in centres], axis=0)
        if nearest.sum() <= 0:
            return None
        centres.append(scaled[rng.choice(len(scaled), p=nearest / nearest.sum())])
    centres, labels = np.asarray(centres), None
    for _ in range(rounds):
        new = np.argmin(((scaled[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.asarray([scaled[labels == j].mean(axis=0) if (labels == j).any() else centres[j] for j in range(k)])
    return labels, float(((scaled - centres[labels]) ** 2).sum())


def components(values: np.ndarray, count: int, starts: int = KMEANS_STARTS, rounds: int = 100) -> np.ndarray:
    """Cluster labels of the rows of ``values`` (standardised): the best of ``starts`` k-means
    runs (seeds 0, 1, ...: deterministic), with fewer clusters where one would hold too few rows
    to fit a Gaussian."""
    needed = len(FEATURE_NAMES) + 2
    spread = values.std(axis=0)
    scaled = (values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    for k in range(min(count, len(values) // needed), 1, -1):
        runs = [run for run in (_kmeans(scaled, k, seed, rounds) for seed in range(starts)) if run is not None]
        runs = [run for run in runs if np.bincount(run[0], minlength=k).min() >= needed]
        if runs:
            return min(runs, key=lambda run: run[1])[0]
    return np.zeros(len(values), dtype=np.intp)


def fit_guard(
    train: dict[str, np.ndarray], quantile=DEFAULT_QUANTILE, margin=DEFAULT_MARGIN, shrinkage=DEFAULT_SHRINKAGE,
    count: int = DEFAULT_COMPONENTS, as_is: dict[str, int] | None = None,
) -> Guard:  # fmt: skip
    """A guard from each source's train feature matrix: ``count`` Gaussians per source (fewer
    where a cluster would be too small). ``as_is``: how many of a source's rows are slices as
    they are (the rest re-framed), for the record."""
    sources, split = [], {}
    for name, values in train.items():
        labels = components(values, count)
        split[name] = int(labels.max()) + 1
        for j in range(split[name]):
            label = name if split[name] == 1 else f"{name} #{j + 1}"
            sources.append(fit_source(label, values[labels == j], quantile, margin, shrinkage))
    metadata = {
        "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rule": f"per source: {count} Gaussians (k-means, best of {KMEANS_STARTS} starts), each accepts squared Mahalanobis distance <= "
        f"{quantile}th percentile of its train slices x {margin}",
        "shrinkage": shrinkage,
        "components": split,
        "train_slices": {name: int((as_is or {}).get(name, len(values))) for name, values in train.items()},
        "train_rows": {name: int(len(values)) for name, values in train.items()},
    }
    return Guard(sources, metadata)


def acceptance(guard: Guard, sources, spec=None) -> dict:
    """How many of ``sources`` (files or bytes) the guard accepts, and why it refused the rest."""
    accepted, refused, checks = 0, 0, {}
    for source in sources:
        try:
            verdict = guard.check(decode_slice(source, spec))
        except BadSliceError as error:
            checks[f"unreadable:{error.reason}"] = checks.get(f"unreadable:{error.reason}", 0) + 1
            refused += 1
            continue
        if verdict.accepted:
            accepted += 1
        else:
            refused += 1
            checks[verdict.check] = checks.get(verdict.check, 0) + 1
    total = accepted + refused
    return {"n": total, "accepted": accepted, "refused": refused, "rate_accepted": accepted / total if total else None, "refused_by": checks}


def measure(guard: Guard, data: list[Path], negative_seed: int = 1, spec=None) -> dict:
    """Acceptance per source and split, refusal per negative category."""
    from convert.guard_negatives import negatives

    figures = {"sources": {}, "negatives": {}}
    for root in data:
        splits = {split: acceptance(guard, slice_files(root, split), spec) for split in ("train", "val")}
        splits[REFRAMED] = acceptance(guard, reframed_files(slice_files(root, "val"), MEASURE_FRAMING_SEED, spec))
        splits[TURNED] = acceptance(guard, turned_files(slice_files(root, "val"), TURN_DEGREES, spec))
        splits[SOFT] = acceptance(guard, soft_tissue_files(slice_files(root, "val"), spec))
        figures["sources"][Path(root).name] = splits
    for category, files in negatives(negative_seed, part=None).items():  # both parts: nothing is fitted on them
        result = acceptance(guard, files, spec)
        result["rate_refused"] = result["refused"] / result["n"] if result["n"] else None
        figures["negatives"][category] = result
    refused = sum(r["refused"] for r in figures["negatives"].values())
    total = sum(r["n"] for r in figures["negatives"].values())
    figures["negatives_overall"] = {"n": total, "refused": refused, "rate_refused": refused / total if total else None}
    return figures


def report_text(figures: dict) -> str:
    lines = ["acceptance of real axial chest CT slices (train fitted the guard; val did not; val re-framed: each val slice "
             f"in a 512 x 512 air frame at 40-70 %, half turned by up to {TILT_DEGREES:g} degrees, half with a table, half re-windowed):"]  # fmt: skip
    for name, splits in figures["sources"].items():
        for split, r in splits.items():
            if r["n"]:
                lines.append(f"  {name:<14} {split:<13} {r['accepted']:>5}/{r['n']:<5} accepted  {r['rate_accepted']:.2%}  refused by {r['refused_by']}")
    lines.append("refusal of images that are not chest CT slices (convert/guard_negatives.py and guard_negatives_medical.py, not used for fitting):")
    for name, r in figures["negatives"].items():
        lines.append(f"  {name:<34} {r['refused']:>4}/{r['n']:<4} refused  {r['rate_refused']:.1%}  {r['refused_by']}")
    overall = figures["negatives_overall"]
    lines.append(f"  {'all categories':<34} {overall['refused']:>4}/{overall['n']:<4} refused  {overall['rate_refused']:.1%}")
    return "\n".join(lines)


def guard_section(figures: dict, command: str) -> str:
    """The model card's "Input guard" section."""
    lines = [
        GUARD_START,
        "## Input guard",
        "",
        "Before a slice is scored, `device/core/guard.py` decides whether it is an axial chest CT slice; anything else is "
        "refused with reason `not-ct` (`ctpi predict`, the watch daemon's `rejected/`, the page; `--no-guard` skips it). "
        "A DICOM file whose header says it is not CT (Modality), not axial (ImageOrientationPatient, 30° tolerance) or "
        "not the chest (BodyPartExamined HEAD, ABDOMEN...) is refused at once. The body is then found (what is "
        "brighter than air, less a scanner table and separate labels) and every feature is computed on its bounding "
        "box, so a slice cropped tight to the body and one in a scanner's square frame of air look alike "
        f"(`device/core/guard_body.py`, features v{FEATURE_VERSION}). Rules refuse colour images, flat images, noise and "
        f"images without dark lungs inside a body; then {DEFAULT_COMPONENTS} Gaussians per training source over "
        f"{len(FEATURE_NAMES)} features of a 64-pixel view of the body (`{GUARD_FILE}`, hashed in the manifest), fitted on "
        "its train slices as they are and re-framed, and as many apart on the same slices in a soft-tissue window, refuse "
        "what is unlike all of them.",
        "",
        "| real CT source | split | slices | accepted |",
        "|---|---|---|---|",
    ]
    for name, splits in figures["sources"].items():
        for split, r in splits.items():
            if r["n"]:
                lines.append(f"| {name} | {split} | {r['n']} | {r['rate_accepted']:.1%} |")
    lines += ["", "| not a chest CT slice | images | refused |", "|---|---|---|"]
    for name, r in figures["negatives"].items():
        lines.append(f"| {name} | {r['n']} | {r['rate_refused']:.1%} |")
    overall = figures["negatives_overall"]
    lines += [
        f"| **all** | {overall['n']} | **{overall['rate_refused']:.1%}** |",
        "",
        "Train slices fitted the guard (as they are and re-framed), so their acceptance is optimistic; val was not "
        f"used. *{REFRAMED}*: each val slice pasted, at a random 40-70 % of the frame, into a 512 x 512 frame of air, "
        f"half of them turned by up to {TILT_DEGREES:g} degrees either way (a patient lies a little turned), half with a scanner table (a bright curved line or two) under the body, half re-windowed (level, "
        "width, gamma), as a scanner or PACS exports a slice (`convert/reframe.py`, other framings than the fitted "
        f"train ones). *{TURNED}*: each val slice as it is, turned by {TURN_DEGREES:g} degrees (every second one the "
        f"other way), its corners filled with its own air. *{SOFT}*: each val slice as it is, its grey levels read as "
        "the lung window (level -600, width 1500 HU) and shown in a soft-tissue window (level 40, width 400). The negatives are built "
        "from package sample images and synthetic renderings (`convert/guard_negatives.py`, both parts) and were never "
        "used for fitting; the synthetic X-ray, coronal, head and abdominal CT images are simple phantoms, so real "
        "images of those kinds given as PNG or JPEG may pass more often (as DICOM their header refuses them). "
        "A lung-base slice that is mostly abdomen can be refused.",
        "",
        f"Refit with: `{command}`",
        GUARD_END,
        "",
    ]
    return "\n".join(lines)


def with_guard_section(card: str, section: str) -> str:
    return with_marked_section(card, GUARD_START, GUARD_END, section)


def fit_bundle(
    bundle_path: Path, data: list[Path], quantile=DEFAULT_QUANTILE, margin=DEFAULT_MARGIN, command: str | None = None,
    report: bool = True, count: int = DEFAULT_COMPONENTS,
) -> dict:  # fmt: skip
    """Fit, write ``guard.json`` into the bundle, re-hash the manifest, update the card.
    Returns the figures (empty without ``report``)."""
    bundle = load_bundle(bundle_path)
    train, as_is = {}, {}
    for root in data:
        files = slice_files(root, "train")
        values, failed = feature_matrix(files, bundle.spec)
        if failed:
            log.warning("%s: %d train files could not be read", root, failed)
        framed = [feature_matrix(reframed_files(files, seed, bundle.spec), bundle.spec)[0] for seed in FIT_FRAMING_SEEDS[:FRAMED_COPIES]]
        train[Path(root).name], as_is[Path(root).name] = np.concatenate([values, *framed]), len(values)
        # "lung or soft-tissue window" (#13): the same slices in a soft-tissue window get
        # Gaussians of their own; mixed into the source's, they widened it to abdominal CT
        soft = feature_matrix(soft_tissue_files(files, bundle.spec), bundle.spec)[0]
        if len(soft) >= len(FEATURE_NAMES) + 2:  # a Gaussian needs that many (fit_source)
            train[f"{Path(root).name}{SOFT_SUFFIX}"] = soft
            as_is[f"{Path(root).name}{SOFT_SUFFIX}"] = len(soft)
    guard = fit_guard(train, quantile, margin, count=count, as_is=as_is)
    figures = measure(guard, data, spec=bundle.spec) if report else {}
    document = guard.to_dict()
    if figures:
        document["figures"] = figures
    (bundle.path / GUARD_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    command = command or "python -m convert.guard --bundle BUNDLE " + " ".join(f"--data {Path(d).name}" for d in data)
    manifest = dict(bundle.manifest)
    manifest["guard"] = {"file": GUARD_FILE, "feature_version": FEATURE_VERSION, "sources": list(train), "command": command}
    write_manifest(bundle.path, manifest)
    card_path = bundle.path / "MODEL_CARD.md"
    if figures and card_path.is_file():
        card_path.write_text(with_guard_section(card_path.read_text(encoding="utf-8"), guard_section(figures, command)), encoding="utf-8")
        write_manifest(bundle.path, manifest)  # the card is hashed too
    load_bundle(bundle.path)  # the result must verify
    return figures


def fit_for_conversion(bundle_path: Path, data) -> Bundle:
    """The conversion's guard step (``python -m convert``): fit on the same data folder(s)
    the bundle was converted from, measure, and return the re-verified bundle."""
    roots = list(data) if isinstance(data, (list, tuple)) else [data]
    try:
        fit_bundle(Path(bundle_path), [Path(root) for root in roots])
    except ValueError as error:  # too few train slices: the bundle ships unguarded, and says so
        log.warning("no input guard fitted for %s: %s", bundle_path, error)
        print(f"convert: WARNING no input guard fitted: {error}", file=sys.stderr)
    return load_bundle(bundle_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.guard", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, action="append", help="bundle folder (repeat for several)")
    parser.add_argument("--data", type=Path, required=True, action="append", help="an ImageFolder per training source (repeat)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE, help=f"percentile of train distances accepted (default {DEFAULT_QUANTILE})")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help=f"factor on that distance (default {DEFAULT_MARGIN})")
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS, help=f"Gaussians per source (default {DEFAULT_COMPONENTS})")
    parser.add_argument("--report", action="store_true", help="only measure the bundle's current guard; change nothing")
    parser.add_argument("--json", action="store_true", help="figures as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for root in args.data:
        if not slice_files(root, "train"):
            print(f"convert.guard: {root} has no train/<label>/ slices", file=sys.stderr)
            return 2
    for bundle_path in args.bundle:
        if args.report:
            from device.core.guard import load_guard

            bundle = load_bundle(bundle_path)
            guard = load_guard(bundle)
            if guard is None:
                print(f"convert.guard: {bundle_path} has no {GUARD_FILE}; fit one first", file=sys.stderr)
                return 2
            figures = measure(guard, args.data, spec=bundle.spec)
        else:
            command = "python -m convert.guard --bundle " + str(bundle_path) + " " + " ".join(f"--data {root}" for root in args.data)
            figures = fit_bundle(bundle_path, args.data, args.quantile, args.margin, command, count=args.components)
        print(json.dumps(figures, indent=1) if args.json else f"{bundle_path}:\n{report_text(figures)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
